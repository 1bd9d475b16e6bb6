"""The short evaluation that closes `train.py` (the `eval` stage).

On the evaluation split: clean accuracy of the target and of MID's C(E_s(·)); accuracy under each
transfer attack crafted on the target (the paper's protocol); accuracy under each white-box attack
crafted on the MID pipeline itself; and the regeneration PSNR of D_t(E_s(x)).
"""

from __future__ import annotations

import numpy as np

from mid_tf.evaluation.robustness import accuracy, craft
from mid_tf.models import MIDModels, build_pipeline, build_regenerator
from mid_tf.training import metrics


def evaluate_summary(models: MIDModels, images: np.ndarray, labels: np.ndarray, *, transfer_attacks,
                     whitebox_attacks, seed: int = 0, batch_size: int = 500, progress: bool = True,
                     test_ds=None) -> dict:
    x = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images
    mid = build_pipeline(models.student_encoder, models.classifier, name="mid_pipeline")
    result = {"examples": int(len(x)), "target": {"clean": accuracy(models.target, x, labels)},
              "mid": {"clean": accuracy(mid, x, labels)}, "transfer": {}, "whitebox": {}}
    for name in transfer_attacks:
        if progress:
            print(f"transfer attack {name} (crafted on the target)", flush=True)
        adv = craft(name, models.target, x, labels, batch_size=batch_size, seed=seed, progress=progress)
        result["transfer"][name] = {"target": accuracy(models.target, adv, labels), "mid": accuracy(mid, adv, labels)}
    for name in whitebox_attacks:
        if progress:
            print(f"white-box attack {name} (crafted on C(E_s(.)))", flush=True)
        adv = craft(name, mid, x, labels, batch_size=batch_size, seed=seed, progress=progress)
        result["whitebox"][name] = {"mid": accuracy(mid, adv, labels)}
    if test_ds is not None:
        regen = build_regenerator(models.student_encoder, models.decoder)
        result["mid"]["regeneration_psnr_db"] = metrics.reconstruction_quality(regen, test_ds)["psnr_db"]
    return result


def format_eval(result: dict) -> str:
    lines = [f"evaluation on {result['examples']} test images",
             f"  {'':<22}{'target':>10}{'MID':>10}",
             f"  {'clean':<22}{result['target']['clean'] * 100:>9.2f}%{result['mid']['clean'] * 100:>9.2f}%"]
    for name, r in result["transfer"].items():
        lines.append(f"  {'transfer ' + name:<22}{r['target'] * 100:>9.2f}%{r['mid'] * 100:>9.2f}%")
    for name, r in result["whitebox"].items():
        lines.append(f"  {'white-box ' + name:<22}{'':>10}{r['mid'] * 100:>9.2f}%")
    if "regeneration_psnr_db" in result["mid"]:
        lines.append(f"  regeneration PSNR D_t(E_s(x)): {result['mid']['regeneration_psnr_db']:.2f} dB")
    return "\n".join(lines)
