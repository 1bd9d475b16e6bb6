"""Export of the deployed MID model for TF Serving (SavedModel + warmup + models.config + model card).

The model card (`card`), the limits (`limits`) and the publishing rules (`publish`) need no TensorFlow,
so `mid-export` checks its flags and the model_dir before TensorFlow loads; the SavedModel side is
imported on first use.
"""

from mid_tf.export.card import build_card
from mid_tf.export.errors import ExportError
from mid_tf.export.limits import ServingLimits
from mid_tf.export.publish import clean_stale, existing_versions, next_version

_SAVEDMODEL = ("SIGNATURES", "build_serving_module", "export_model", "read_export_json", "read_model_card",
               "signature_summary")


def __getattr__(name):
    if name in _SAVEDMODEL:
        from mid_tf.export import savedmodel
        return getattr(savedmodel, name)
    if name == "verify_export":
        from mid_tf.export.verify import verify_export
        return verify_export
    raise AttributeError(name)


__all__ = ["ExportError", "ServingLimits", "build_card", "clean_stale", "existing_versions", "next_version",
           "verify_export", *_SAVEDMODEL]
