"""Where the regeneration D_t(E_s(x~)) loses PSNR: the features it decodes, or the pooling switches it unpools to.

LeNet's decoder puts each feature back at the position of its encoder's maximum (models/pooling.py), so a
regeneration decodes two things computed from the input: features and switches. Decoding one encoder's features
with the switches of another encoder, or of another input, separates them. Every row decodes with `decoder`
(D_t by default) and is scored against the clean x (PSNR / SSIM of the output clipped to [0, 1]):

  features   switches
  E_t(x)     E_t(x)       the teacher's autoencoder: the decoder's own operating point
  E_t(x)     E_t(x~)      perfect features, the switches an adversarial input moves
  E_t(x)     E_s(x)       perfect features, the student's switches on the clean input
  E_t(x)     E_s(x~)      perfect features, the student's switches on x~
  E_s(x)     E_s(x)       the regeneration of a clean input
  E_s(x~)    E_s(x~)      the regeneration of x~ (the paper's D_t(E_s(x~)))
  E_s(x~)    E_t(x)       the student's features on x~, the teacher's clean switches

The switches are non-differentiable (they carry no gradient), so no loss on D_t(E_s(x~)) can move the student's
switches towards the ones D_t was trained with: a row "E_t(x) features, E_s(x~) switches" well below the teacher's
bounds what a pixel term can reach. A decoder built with `decoder_unpool="nearest"` ignores switches: its rows
with the same features are equal.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from mid_tf.models import MIDModels, decode, encode

# (features from (encoder, input), switches from (encoder, input)); encoder t = E_t, s = E_s; input x or x~.
ROWS = (("t", "x", "t", "x"), ("t", "x", "t", "x~"), ("t", "x", "s", "x"), ("t", "x", "s", "x~"),
        ("s", "x", "s", "x"), ("s", "x~", "s", "x~"), ("s", "x~", "t", "x"))


def label(row) -> str:
    (fe, fi, se, si), name = row, {"t": "E_t", "s": "E_s"}
    return f"features {name[fe]}({fi}), switches {name[se]}({si})"


def switch_ablation(models: MIDModels, batches, decoder=None) -> list[dict]:
    """[{"row", "features", "switches", "psnr_db", "ssim"}] over `batches` of (x, x~) pairs, in ROWS' order:
    mean per-image PSNR (capped at 100 dB) and SSIM against x. `decoder`: default D_t (models.decoder)."""
    decoder = models.decoder if decoder is None else decoder
    psnr, ssim = [[] for _ in ROWS], [[] for _ in ROWS]
    for x, x_adv in batches:
        x = tf.convert_to_tensor(x, tf.float32)
        codes = {(e, i): encode(enc, inp) for e, enc in (("t", models.teacher_encoder), ("s", models.student_encoder))
                 for i, inp in (("x", x), ("x~", tf.convert_to_tensor(x_adv, tf.float32)))}
        for n, (fe, fi, se, si) in enumerate(ROWS):
            out = tf.clip_by_value(decode(decoder, codes[fe, fi][0], codes[se, si][1]), 0.0, 1.0)
            psnr[n].append(np.minimum(tf.image.psnr(out, x, max_val=1.0).numpy(), 100.0))
            ssim[n].append(tf.image.ssim(out, x, max_val=1.0).numpy())
    return [{"row": label(row), "features": f"{row[0]}({row[1]})", "switches": f"{row[2]}({row[3]})",
             "psnr_db": float(np.concatenate(p).mean()), "ssim": float(np.concatenate(s).mean())}
            for row, p, s in zip(ROWS, psnr, ssim)]


def format_markdown(rows: list[dict]) -> str:
    lines = ["| features | switches | PSNR dB | SSIM |", "|---|---|---:|---:|"]
    name = {"t": "E_t", "s": "E_s"}
    for r in rows:
        lines.append(f"| {name[r['features'][0]]}{r['features'][1:]} | {name[r['switches'][0]]}{r['switches'][1:]} "
                     f"| {r['psnr_db']:.2f} | {r['ssim']:.3f} |")
    return "\n".join(lines) + "\n"
