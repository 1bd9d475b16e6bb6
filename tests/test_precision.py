"""`--*_precision=auto`: bfloat16 only where it is native (training/precision.py).

A CPU without AVX512_BF16/AMX-BF16 emulates bfloat16 and trains far slower than in float32, so the
flagfiles ask for `auto`; these tests pin the decision on fake /proc/cpuinfo files, with no GPU visible.
"""

from __future__ import annotations

import pytest
import tensorflow as tf

from mid_tf.training import precision

ZEN3 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma f16c\n"
ZEN4 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16 avx512_vnni\n"
SPR = "processor\t: 0\nmodel name\t: Intel Xeon\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n"


@pytest.fixture
def no_gpu(monkeypatch):
    real = tf.config.list_physical_devices
    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda kind=None: [] if kind == "GPU" else real(kind))


def _cpuinfo(tmp_path, text):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, expected", [(ZEN3, "float32"), (ZEN4, "mixed_bfloat16"),
                                            (SPR, "mixed_bfloat16"), ("", "float32")])
def test_auto_picks_bfloat16_only_where_native(tmp_path, no_gpu, text, expected):
    chosen, why = precision.resolve("auto", _cpuinfo(tmp_path, text))
    assert chosen == expected
    assert why.startswith("auto: ")
    assert ("emulated" in why) == (expected == "float32")


def test_explicit_precision_is_kept_and_bad_values_are_refused(tmp_path, no_gpu):
    zen3 = _cpuinfo(tmp_path, ZEN3)
    assert precision.resolve("mixed_bfloat16", zen3) == ("mixed_bfloat16", "requested")
    assert precision.resolve("float32", zen3) == ("float32", "requested")
    with pytest.raises(ValueError, match="auto"):
        precision.resolve("float16", zen3)
    assert precision.cpu_flags(str(tmp_path / "missing")) == set()
