"""The evaluation report: every registered attack, numbers that recompute, the schema, sanity flags."""

import dataclasses
import json
import os

import attack_fixtures as F
import keras
import numpy as np
import pytest
import tensorflow as tf

from mid_tf.attacks import REGISTRY, get_spec
from mid_tf.evaluation.report import ReportInput, build_report
from mid_tf.evaluation.robustness import accuracy, craft
from mid_tf.evaluation.sanity import attack_group, sanity_flags
from mid_tf.evaluation.writers import REQUIRED_KEYS, SCHEMA, load_report, validate_report, write_report

# Cheap settings for the eager-only attacks, same registered names.
CHEAP = {"cw_l2": "max_iterations=10,binary_search_steps=1", "cw_l2_t0": "max_iterations=10,binary_search_steps=1",
         "spsa": "nb_iter=3,spsa_samples=16", "spsa_t0": "nb_iter=3,spsa_samples=16",
         "autoattack": "max_iter=5,square_max_iter=20", "autoattack_fast": "max_iter=5,square_max_iter=20", "apgd_ce": "max_iter=5", "apgd_dlr": "max_iter=5",
         "square": "max_iter=20", "deepfool": "max_iter=5", "spatial": "num_translations=2,num_rotations=2",
         **F.FEWER_STEPS}
POOL = ("clean", "pgd10", "pgd10_t0", "mim10", "mim10_t0")


def _attack_list(names):
    return [f"{n}:{CHEAP[n]}" if n in CHEAP else n for n in names]


class Saturated(keras.Model):
    """Gradient masking by construction: the target's logits x1000 saturate the softmax, so CE-gradient
    attacks (FGSM, PGD) see exactly-zero gradients on every correctly classified image."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def call(self, x, training=False):
        return 1000.0 * self.net(x, training=False)


@pytest.fixture(scope="module")
def tiny():
    return F.tiny_target(), F.test_batch(128)


def test_report_covers_every_registered_attack_and_recomputes(tiny, tmp_path):
    target, (x, y) = tiny
    x, y = x[:24], y[:24]
    other = F.train_target(width=0.25, train_examples=2000, seed=1)
    names = [n for n in REGISTRY if n != "clean"]
    report, grids = build_report(ReportInput({"target": target, "other": other}, x, y, attacks=_attack_list(names),
                                             whitebox_attacks=["fgsm", "pgd40"], pool=POOL, slow_examples=8,
                                             regenerator=lambda z: z, eps_sweep=(0.1, 0.3), grid_attacks=("pgd40",),
                                             grid_images=4), progress=False)
    assert set(report["transfer"]) == set(names)
    assert report["attacks"]["cw_l2"]["examples"] == 8 and report["attacks"]["pgd40"]["examples"] == 24
    assert report["attacks"]["pgd40"]["group"] == "known" and report["attacks"]["fgsm"]["group"] == "unknown"
    # One number recomputed directly: transfer PGD-40 from the target, classified by `other`.
    adv = craft("pgd40", lambda z: target(z, training=False), x, y, seed=0, progress=False)
    assert report["transfer"]["pgd40"]["other"] == pytest.approx(accuracy(other, adv, y))
    assert report["clean"]["other"] == pytest.approx(accuracy(other, x, y))
    assert report["whitebox"]["pgd40"]["target"] == report["transfer"]["pgd40"]["target"]
    validate_report(report)
    paths = write_report(report, str(tmp_path), grids)
    for key in ("json", "md", "transfer_png", "whitebox_png", "grid_pgd40"):
        assert os.path.getsize(paths[key]) > 100, key
    again = load_report(paths["json"])
    assert again["schema"] == SCHEMA and again["transfer"]["pgd40"] == report["transfer"]["pgd40"]
    md = open(paths["md"]).read()
    assert "mean unknown" in md and "| cw_l2 |" in md


def test_regeneration_is_measured_on_the_transfer_adversarials_and_shown(tiny, tmp_path):
    """report["regeneration"][attack]: PSNR/SSIM of the regenerator on the transfer adversarials (crafted on the
    target) against the clean x, next to the clean row; report.md shows both."""
    target, (x, y) = tiny
    x, y = x[:16], y[:16]

    def blur(z):  # a stand-in regenerator D_t(E_s(.)) that is not the identity
        return tf.nn.avg_pool2d(z, 3, 1, "SAME")

    pgd = "pgd40:nb_iter=3,eps_iter=0.1"
    report, _ = build_report(ReportInput({"target": target}, x, y, attacks=[pgd], pool=POOL, eps_sweep=(),
                                         regenerator=blur), progress=False)
    adv = craft(pgd, lambda z: target(z, training=False), x, y, seed=0, progress=False)
    want = float(np.mean(tf.image.psnr(tf.clip_by_value(blur(adv), 0, 1), x, max_val=1.0)))
    assert set(report["regeneration"]) == {"clean", "pgd40"}
    assert report["regeneration"]["pgd40"]["psnr_db"] == pytest.approx(want, rel=1e-5)
    assert report["regeneration"]["pgd40"]["psnr_db"] < report["regeneration"]["clean"]["psnr_db"] - 1.0
    assert 0 < report["regeneration"]["pgd40"]["ssim"] < report["regeneration"]["clean"]["ssim"]
    md = open(write_report(report, str(tmp_path))["md"]).read()
    assert "Robust regeneration D_t(E_s(.)) against x" in md
    assert f"| pgd40 | {report['regeneration']['pgd40']['psnr_db']:.2f} |" in md, md


def test_schema_validation_names_the_broken_key(tiny):
    target, (x, y) = tiny
    report, _ = build_report(ReportInput({"target": target}, x[:8], y[:8], attacks=["fgsm"], pool=POOL, eps_sweep=()),
                             progress=False)
    validate_report(report)
    for key in ("summary", "sanity"):
        broken = json.loads(json.dumps(report))
        del broken[key]
        with pytest.raises(ValueError, match=key):
            validate_report(broken)
    broken = json.loads(json.dumps(report))
    broken["transfer"]["fgsm"]["target"] = 1.5
    with pytest.raises(ValueError, match="transfer.fgsm.target"):
        validate_report(broken)


def test_build_report_takes_one_typed_input(tiny):
    target, (x, y) = tiny
    spec = ReportInput({"target": target}, x[:8], y[:8], attacks=["fgsm"], pool=POOL, eps_sweep=())
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.seed = 1
    assert spec.whitebox == ["fgsm"]  # white-box attacks default to the transfer ones
    report, grids = build_report(spec, progress=False)
    assert set(report) == set(REQUIRED_KEYS) | {"threat_model"} and grids == {}
    assert report["threat_model"].startswith("mnist: L-inf eps 0.3")  # optional key: older reports lack it
    assert report["whitebox"]["fgsm"]["target"] == report["transfer"]["fgsm"]["target"]  # shared, not recrafted
    with pytest.raises(TypeError):
        build_report({"target": target}, x[:8], y[:8], attacks=["fgsm"])  # the input is one ReportInput
    with pytest.raises(ValueError, match="transfer source 'target'"):
        build_report(dataclasses.replace(spec, models={"other": target}), progress=False)


def test_sanity_flags_fire_on_a_gradient_masking_model_and_not_on_its_honest_twin(tiny):
    target, (x, y) = tiny
    x, y = x[:64], y[:64]
    masked = Saturated(target)
    report, _ = build_report(ReportInput({"target": target, "masked": masked, "honest": target}, x, y,
                                         attacks=["fgsm", "pgd40"], pool=POOL, eps_sweep=(0.3, 1.0)), progress=False)
    fired = {(f["flag"], f["model"]) for f in report["sanity"]}
    assert ("whitebox_above_transfer", "masked") in fired, report["sanity"]
    assert ("large_eps_not_zero", "masked") in fired, report["sanity"]
    assert not {m for _, m in fired} & {"honest"}, report["sanity"]
    # The checks on constructed numbers: a weaker attack beating a stronger one, eps going the wrong way.
    fake = {"transfer": {}, "whitebox": {"fgsm": {"m": 0.1}, "pgd40": {"m": 0.5}}, "eps_sweep": {"m": {"0.1": 0.2,
            "0.3": 0.6}}, "zero_gradient_fraction": {"m": 0.5}}
    kinds = {f["flag"] for f in sanity_flags(fake)}
    assert kinds == {"weaker_beats_stronger", "eps_not_monotone", "zero_gradients"}


def test_known_and_unknown_follow_the_pool():
    assert attack_group("pgd40", POOL) == "known" and attack_group("mim40_t0", POOL) == "known"
    assert attack_group("pgd_l2", POOL) == "unknown" and attack_group("cw_l2", POOL) == "unknown"
    assert attack_group("fgsm", ("clean", "fgsm")) == "known"


def test_eval_stage_writes_report_figures_and_tensorboard(tmp_path, mnist_data_dir):
    from mid_tf import stages
    from mid_tf.config import BaselineConfig, DataConfig, MIDStageConfig, RunConfig, StageTrainConfig

    quick = "pgd40:nb_iter=2,eps_iter=0.15"
    cfg = RunConfig(model_dir=str(tmp_path), data=DataConfig(data_dir=mnist_data_dir, train_examples=512,
                                                             eval_examples=64),
                    stages=("target", "teacher", "pgd_at", "mid", "eval"), width=0.25, verbose=0,
                    target=StageTrainConfig(epochs=1, batch_size=128), teacher=StageTrainConfig(epochs=1, batch_size=128),
                    baseline=BaselineConfig(epochs=1, batch_size=128, attack=quick),
                    mid=MIDStageConfig(epochs=1, batch_size=128, steps_per_epoch=2, learning_rate=1e-3, val_examples=0,
                                       pool=f"clean,fgsm,{quick}"),
                    eval_attacks=("fgsm", "pgd40:nb_iter=5,eps_iter=0.1"), eval_whitebox_attacks=("fgsm",),
                    eval_eps_sweep=(0.3, 1.0))
    summary = stages.run(cfg)
    report = load_report(os.path.join(tmp_path, "eval", "report.json"))
    assert report["models"] == ["target", "mid", "pgd_at"] and report["examples"] == 64
    assert set(report["transfer"]) == {"fgsm", "pgd40"} and set(report["whitebox"]["fgsm"]) == set(report["models"])
    assert report["attacks"]["pgd40"]["group"] == "known" and report["attacks"]["fgsm"]["group"] == "known"
    for name in ("report.md", "robust_accuracy_transfer.png", "robust_accuracy_whitebox.png", "grid_fgsm.png"):
        assert os.path.getsize(os.path.join(tmp_path, "eval", name)) > 100, name
    assert os.listdir(os.path.join(tmp_path, "logs", "eval"))
    assert summary["stages"]["eval"]["clean"]["mid"] == report["clean"]["mid"]
    # --eval_workers=2: a helper process (the same configuration, --stages=eval) shares the new pieces.
    more = dataclasses.replace(cfg, stages=("eval",), eval_workers=2,
                               eval_whitebox_attacks=("fgsm", "bim40:nb_iter=3,eps_iter=0.1", quick))
    summary2 = stages.run(more)
    report2 = load_report(os.path.join(tmp_path, "eval", "report.json"))
    assert set(report2["whitebox"]) == {"fgsm", "bim40", "pgd40"} and summary2["stages"]["eval"]["helpers_exit"] == [0]
    assert all(v is not None for per in report2["whitebox"].values() for v in per.values())
    assert report2["whitebox"]["fgsm"] == report["whitebox"]["fgsm"] and report2["clean"] == report["clean"]
    with open(os.path.join(tmp_path, "eval", "helper-1.log")) as f:
        log = f.read()
    assert "white-box fgsm on mid, 64 images: done earlier (memo)" in log, log[-2000:]  # same fingerprints
    assert "report:" not in log  # the helper never writes the report
    with open(os.path.join(tmp_path, "summary.json")) as f:
        assert "helper" not in json.load(f)["stages"]["eval"]  # the helper never writes the summary


def _kill_in_call(n: int, spec, memo_path: str, monkeypatch) -> list:
    """Runs build_report(spec) with a memo at `memo_path` and kills it (KeyboardInterrupt) in its n-th craft
    call; returns the arguments of the n calls."""
    from mid_tf.evaluation import pieces
    from mid_tf.evaluation.memo import ReportMemo
    real_craft, calls = pieces.craft, []

    def killing(*a, **k):
        calls.append(a)
        if len(calls) == n:
            raise KeyboardInterrupt("killed")
        return real_craft(*a, **k)

    monkeypatch.setattr(pieces, "craft", killing)
    with pytest.raises(KeyboardInterrupt):
        build_report(spec, memo=ReportMemo(memo_path), progress=False)
    monkeypatch.setattr(pieces, "craft", real_craft)
    return calls


def test_killed_evaluation_resumes_from_the_memo_and_retrained_models_are_redone(tiny, tmp_path, monkeypatch):
    from mid_tf.evaluation import pieces
    from mid_tf.evaluation.memo import ReportMemo

    target, (x, y) = tiny
    x, y = x[:32], y[:32]
    other = F.train_target(width=0.25, train_examples=2000, seed=1)
    spec = ReportInput({"target": target, "other": other}, x, y, attacks=["fgsm", "pgd40:nb_iter=3,eps_iter=0.1"],
                       whitebox_attacks=["fgsm", "pgd40:nb_iter=3,eps_iter=0.1"], pool=POOL, eps_sweep=(0.3,))
    fresh, _ = build_report(spec, progress=False)
    real_craft, calls = pieces.craft, []

    def counting(*a, **k):
        calls.append(a[0])
        return real_craft(*a, **k)

    path = str(tmp_path / "memo.json")
    _kill_in_call(4, spec, path, monkeypatch)  # 2 transfer attacks, white-box FGSM on `other` finished
    monkeypatch.setattr(pieces, "craft", counting)
    memo = ReportMemo(path)
    resumed, _ = build_report(spec, memo=memo, progress=False)
    assert memo.hits == 3 and len(calls) == 1 + 2  # white-box pgd40 on `other` + eps sweep of both models
    for key in ("clean", "transfer", "whitebox", "eps_sweep", "zero_gradient_fraction", "summary"):
        assert resumed[key] == fresh[key], key
    # A retrained model (one weight changed) is evaluated anew; the untouched target is not.
    w = other.get_weights()
    w[-1] = w[-1] + 1.0
    other.set_weights(w)
    calls.clear()
    build_report(spec, memo=ReportMemo(path), progress=False)
    assert len(calls) == 2 + 2 + 1  # both transfer attacks (scored by `other`), its 2 white-box, its sweep


def test_whitebox_shards_add_up_to_the_whole_and_a_killed_run_keeps_its_finished_shards(tiny, tmp_path, monkeypatch):
    """shard_examples=10 on 32 images: 4 pieces per white-box attack and model (the unit workers share), whose
    image-weighted mean is the unsharded row; a run killed mid-attack resumes from its finished shards."""
    from mid_tf.evaluation.memo import ReportMemo

    target, (x, y) = tiny
    x, y = x[:32], y[:32]
    other = F.train_target(width=0.25, train_examples=2000, seed=1)
    kw = dict(attacks=["fgsm"], whitebox_attacks=["fgsm", "bim40:nb_iter=3,eps_iter=0.1"], pool=POOL, eps_sweep=())
    models = {"target": target, "other": other}
    whole, _ = build_report(ReportInput(models, x, y, **kw), progress=False)  # one shard: the unsharded pieces
    spec = ReportInput(models, x, y, shard_examples=10, **kw)
    path = str(tmp_path / "memo.json")
    sizes = [len(a[2]) for a in _kill_in_call(5, spec, path, monkeypatch)]  # transfer FGSM, 3 shards finished
    assert sizes[0] == 32 and all(0 < n <= 10 for n in sizes[1:])  # white-box pieces craft <= 10 images each
    memo, log = ReportMemo(path), []
    sharded, _ = build_report(spec, memo=memo, progress=True, log=log.append)
    assert memo.hits == 4  # the transfer piece and the 3 finished shards
    assert "white-box bim40 on other, images 30-32 of 32" in log and "white-box fgsm on other, images 0-10 of 32: done earlier (memo)" in log
    assert sum('"images"' in k for k in ReportMemo(path).entries) == 3 * 4  # fgsm on other, bim40 on both
    for attack, row in whole["whitebox"].items():
        for m, acc in row.items():  # no random start: shards craft what the whole does (float round-off aside)
            assert sharded["whitebox"][attack][m] == pytest.approx(acc, abs=1 / 32 + 1e-9), (attack, m)


def test_craft_traces_a_graph_safe_attack_once_for_every_shard_and_batch_size(tiny):
    """Shards and batches of any size reuse one trace per (attack, source, image shape): a trace of PGD-100 x 5
    costs about a minute on a 2-core CPU, and a 10,000-image evaluation crafts 10 shards of 2 batch sizes."""
    from mid_tf.evaluation import pieces, robustness
    target, (x, y) = tiny
    fn = pieces.as_fn(target)
    attack = "pgd40:nb_iter=3,eps_iter=0.1,restarts=2"
    first = craft(attack, fn, x[:10], y[:10], batch_size=4, seed=0, progress=False)  # batches of 4, 4, 2
    craft(attack, fn, x[10:17], y[10:17], batch_size=4, seed=0, progress=False, first_batch=10)  # 4, 3
    call = robustness.compiled(get_spec(attack), fn, x.shape[1:])
    assert call.experimental_get_tracing_count() == 1
    again = craft(attack, fn, x[:10], y[:10], batch_size=4, seed=0, progress=False)
    np.testing.assert_array_equal(first, again)  # the same seeds, the same adversarials
    other = craft(attack, pieces.as_fn(target), x[:10], y[:10], batch_size=4, seed=0, progress=False)
    np.testing.assert_allclose(other, first, atol=1e-6)  # another source function: its own trace, same maths


def test_whitebox_attacks_only_the_images_a_model_gets_right(tiny, monkeypatch):
    """White-box pieces craft on the correctly classified images only; the misclassified ones count as broken
    even if an attack would move them back to the right class."""
    from mid_tf.evaluation import pieces
    target, (x, y) = tiny
    x, y = x[:64], y[:64]
    other = F.train_target(width=0.25, train_examples=300, seed=3)  # weak: gets many images wrong
    right = pieces.correct_mask(pieces.as_fn(other), x, y)
    assert 0 < right.sum() < len(y), right.sum()
    seen = []

    def fixing_attack(attack, fn, xs, ys, **kw):  # "attacks" by returning images that every model gets right
        if isinstance(attack, str):  # the report's pieces; the eps sweep passes specs
            seen.append(len(xs))
        return xs

    monkeypatch.setattr(pieces, "craft", fixing_attack)
    report, _ = build_report(ReportInput({"target": target, "other": other}, x, y, attacks=["fgsm"],
                                         whitebox_attacks=["pgd40"], pool=POOL), progress=False)
    target_right = int(pieces.correct_mask(pieces.as_fn(target), x, y).sum())
    assert sorted(seen) == sorted([len(y), target_right, int(right.sum())])  # transfer: all; white-box: the right ones
    assert report["whitebox"]["pgd40"]["other"] == pytest.approx(right.mean())
    assert report["whitebox"]["pgd40"]["other"] <= report["clean"]["other"]


def test_report_lists_the_autoattack_components(tiny):
    target, (x, y) = tiny
    report, _ = build_report(ReportInput({"target": target}, x[:8], y[:8], pool=POOL, slow_examples=8,
                                         attacks=_attack_list(["autoattack", "autoattack_fast"]), whitebox_attacks=[]),
                             progress=False)
    standard, fast = report["attacks"]["autoattack"]["components"], report["attacks"]["autoattack_fast"]["components"]
    assert standard.startswith("APGD-CE (5 iterations") and "APGD-T (targeted DLR, 9 target classes" in standard
    assert "Square (20 queries)" in standard and "FAB-T left out" in standard
    assert fast.startswith("NOT standard AutoAttack") and "untargeted APGD-DLR" in fast
    assert "components" not in report["attacks"].get("fgsm", {})
    from mid_tf.evaluation.writers import format_markdown
    assert f"`autoattack` = {standard}." in format_markdown(report)
