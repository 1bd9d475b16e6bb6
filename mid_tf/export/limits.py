"""What one request to the exported model may hold, and the input contract written into export.json
and the model card. TensorFlow-free, so `mid-export` can define its flags and check them at once.

Why caps at all: TF Serving runs whatever tensor a client sends. An unbounded batch, or one small PNG
that declares a 30000x30000 image (a decompression bomb: the decoder allocates what the header says),
takes the server's memory down for every client. The checks inside the graph (export/checks.py)
refuse such requests with INVALID_ARGUMENT before anything large is allocated.

With server-side batching (deploy/batching_parameters.txt), requests are merged up to the batching
`max_batch_size` before the graph runs, so `max_batch` must be at least that (tests/test_deploy.py
checks the shipped files agree).
"""

from __future__ import annotations

import dataclasses

DEFAULT_MAX_BATCH = 256
# A 32x32 RGB PNG is at most ~3.3 KB even uncompressed; 64 KiB leaves room for metadata chunks
# (ICC profiles, EXIF) while a full request stays within 256 * 64 KiB = 16 MiB.
DEFAULT_MAX_IMAGE_BYTES = 64 * 1024


@dataclasses.dataclass(frozen=True)
class ServingLimits:
    """Per-request caps enforced in every signature (`max_batch`) and in classify_encoded (all)."""
    max_batch: int = DEFAULT_MAX_BATCH
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES

    def __post_init__(self):
        for name in ("max_batch", "max_image_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    def to_json(self) -> dict:
        return {"max_batch": self.max_batch, "max_image_bytes": self.max_image_bytes}


def input_spec(input_shape, limits: ServingLimits) -> dict:
    """The request contract: what each input takes and the caps (export.json "limits", model card "input")."""
    h, w, c = (int(d) for d in input_shape)
    return {
        "image": {"dtype": "float32", "shape": [-1, h, w, c], "value_range": [0.0, 1.0],
                  "signatures": ["serving_default", "regenerate"]},
        "image_bytes": {"dtype": "string", "shape": [-1], "formats": ["PNG", "JPEG"], "height": h, "width": w,
                        "channels": c, "signatures": ["classify_encoded"],
                        "note": "images of exactly height x width pixels; other sizes are refused, not resized"},
        "limits": limits.to_json(),
    }
