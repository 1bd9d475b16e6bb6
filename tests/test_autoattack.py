"""Standard AutoAttack (`autoattack`) and the cheaper chain (`autoattack_fast`) in mid_tf/attacks/art_suite.py.

Checks that `autoattack` is built from Croce & Hein's standard components (APGD-CE, APGD-T over the 9
non-true classes, Square with 5,000 queries), that each of them runs, that APGD-T is really targeted
(one run per target class, targets ranked by clean logit, the loss pulls the target class above the
true one), that the worst case per example is taken
over the components, and that `autoattack_fast` still works and is labelled as not standard.
"""

import pathlib

import numpy as np
import pytest
import tensorflow as tf

import attack_fixtures as F
from mid_tf.attacks import art_suite
from mid_tf.attacks.art_suite import Component, WorstCase, build_art, ranked_targets
from mid_tf.attacks.crafting import make_attack
from mid_tf.attacks.registry import REGISTRY, get_spec

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "attacks.md"
SHAPE = (28, 28, 1)


def _first_pixels(z):
    """A stand-in model for inspecting built attacks (never called by `build_art`)."""
    return tf.reshape(z, [tf.shape(z)[0], -1])[:, :10]


@pytest.fixture(scope="module")
def fn():
    return F.model_fn()


@pytest.fixture(scope="module")
def batch():
    return F.test_batch(16)


def _correct(fn, x, y):
    keep = np.argmax(fn(tf.constant(x)).numpy(), -1) == y
    return x[keep], y[keep]


# ------------------------------------------------------------------ the standard components
def test_autoattack_spec_lists_standard_components():
    spec = REGISTRY["autoattack"]
    assert (spec.eps, spec.eps_iter, spec.targeted, spec.graph_safe) == (0.3, None, False, False)
    assert (spec.param("max_iter"), spec.param("n_target_classes"), spec.param("square_max_iter")) == (100, 9, 5000)
    attack = build_art(spec, _first_pixels, SHAPE, 10)
    names = [c.name for c in attack.components]
    assert names == ["apgd_ce"] + ["apgd_t"] * 9 + ["square"], names
    ce, targeted, square = attack.components[0], attack.components[1:10], attack.components[-1]
    assert not ce.attack.targeted and ce.attack.estimator.loss_fn is art_suite._ce and ce.target_rank is None
    assert [c.target_rank for c in targeted] == list(range(9))
    for c in [ce] + targeted:  # 100 iterations, one random start, Croce & Hein's initial step 2 * eps
        assert (c.attack.max_iter, c.attack.nb_random_init, c.attack.eps, c.attack.eps_step) == (100, 1, 0.3, 0.6)
    for c in targeted:  # the targeted DLR loss in ART's untargeted mode (success = misclassified), as Croce & Hein
        assert not c.attack.targeted and c.attack.estimator.loss_fn is art_suite._dlr_targeted
    assert type(square.attack).__name__ == "SquareAttack"
    assert (square.attack.max_iter, square.attack.eps, square.attack.p_init, square.attack.nb_restarts) == (
        5000, 0.3, 0.8, 1)
    assert attack.eps == 0.3
    small = build_art(get_spec("autoattack:eps=0.1,n_target_classes=3"), _first_pixels, SHAPE, 10)
    assert [c.name for c in small.components] == ["apgd_ce"] + ["apgd_t"] * 3 + ["square"]
    assert small.components[1].attack.eps_step == pytest.approx(0.2) and small.components[-1].attack.eps == 0.1


def test_autoattack_rejects_bad_settings():
    with pytest.raises(ValueError, match="n_target_classes"):
        build_art(get_spec("autoattack:n_target_classes=10"), _first_pixels, SHAPE, 10)
    with pytest.raises(ValueError, match="n_target_classes"):
        build_art(get_spec("autoattack"), _first_pixels, SHAPE, 3)  # targeted DLR needs 4 logits
    with pytest.raises(ValueError, match="untargeted only"):  # the registry refuses it before build_art would
        build_art(get_spec("autoattack_fast:target=fixed:0"), _first_pixels, SHAPE, 10)


def test_targeted_dlr_loss_values():
    logits = tf.constant([[4.0, 3.0, 1.0, 0.0, -1.0]])
    signed = tf.constant(art_suite.signed_labels([1], [0], 5))  # target 1, true class 0
    # maximised: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2) = -(4 - 3) / (4 - (1 + 0) / 2)
    np.testing.assert_allclose(art_suite._dlr_targeted(logits, signed).numpy(), [-1.0 / 3.5], rtol=1e-6)
    np.testing.assert_array_equal(signed.numpy(), [[1.0, -1.0, 0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(ranked_targets([[0.0, 5.0, 2.0, 9.0]], [3]), [[1, 2, 0]])


def _record_generate(monkeypatch, cls, calls):
    original = cls.generate

    def generate(self, x, y=None, **kwargs):
        calls.append((cls.__name__, bool(getattr(self, "targeted", False)), np.array(x), np.array(y)))
        return original(self, x, y, **kwargs)
    monkeypatch.setattr(cls, "generate", generate)


def test_components_run_and_apgd_t_is_targeted_per_class(monkeypatch, fn, batch):
    """A tiny eps leaves examples robust after every component, so every component must run."""
    from art.attacks.evasion import AutoProjectedGradientDescent, SquareAttack
    calls = []
    _record_generate(monkeypatch, AutoProjectedGradientDescent, calls)
    _record_generate(monkeypatch, SquareAttack, calls)
    x, y = _correct(fn, *batch)
    x, y = x[:6], y[:6]
    attack = build_art(get_spec("autoattack:eps=0.005,max_iter=3,square_max_iter=5"), fn, SHAPE, 10)
    np.random.seed(0)
    attack.generate(x=x, y=np.eye(10, dtype=np.float32)[y])
    assert [c[0] for c in calls] == ["AutoProjectedGradientDescent"] * 10 + ["SquareAttack"]
    assert not any(c[1] for c in calls)  # ART's success check = misclassified (see art_suite's docstring)
    assert (calls[0][3] == np.eye(10)[y]).all() and (calls[-1][3].sum(1) == 1).all()  # CE and Square: one-hot
    ranks = ranked_targets(fn(tf.constant(x)).numpy(), y)
    seen = {i: [] for i in range(len(x))}
    for r, (_, _, xs, ys) in enumerate(calls[1:10]):
        rows = [int(np.flatnonzero((x == xi).all(axis=(1, 2, 3)))[0]) for xi in xs]  # clean images are passed
        np.testing.assert_array_equal(np.argmin(ys, 1), ranks[rows, r])  # target (-1) = r-th non-true class by logit
        np.testing.assert_array_equal(np.argmax(ys, 1), y[rows])  # the true class (+1)
        for i, t in zip(rows, np.argmin(ys, 1)):
            seen[i].append(int(t))
    survivors = np.flatnonzero(attack.broken_by == -1)
    assert survivors.size > 0, attack.broken_by
    for i in survivors:  # every one of the 9 other classes was a target once
        assert sorted(seen[i]) == sorted(set(range(10)) - {int(y[i])}), (i, seen[i])


def test_apgd_t_pulls_its_target_above_the_true_class(fn, batch):
    """Targeted for real: APGD-T alone, aimed at the 5th most likely class, breaks the images and leaves
    that class's logit above the true class's on most (ranked 5th on the clean images)."""
    x, y = _correct(fn, *batch)
    x, y = x[:8], y[:8]
    full = build_art(get_spec("autoattack:max_iter=20"), fn, SHAPE, 10)
    apgd_t = next(c for c in full.components if c.target_rank == 4)
    np.random.seed(1)
    adv = WorstCase(full.clf, [apgd_t], 0.3).generate(x, np.eye(10, dtype=np.float32)[y])
    target = ranked_targets(fn(tf.constant(x)).numpy(), y)[:, 4]
    z = fn(tf.constant(adv)).numpy()
    rows = np.arange(len(y))
    assert (z[rows, target] > z[rows, y]).mean() >= 0.875, (z[rows, target], z[rows, y])  # APGD-CE here: 0.625
    assert (np.argmax(z, -1) != y).mean() >= 0.75
    assert np.abs(adv - x).max() <= 0.3 + 1e-5


# ------------------------------------------------------------------ worst case per example
class _FakeClassifier:
    """Logits = the first 10 features; feature 10 holds the example's id."""
    nb_classes = 10

    def predict(self, x):
        return np.asarray(x)[:, :10]


class _BreakIds:
    """A fake component that pushes class 9 past the true class for the given ids (by `step`)."""

    def __init__(self, ids, step=0.3):
        self.ids, self.step, self.seen = set(ids), step, []

    def generate(self, x, y):
        ids = np.rint(x[:, 10] * 10).astype(int)
        self.seen.append(sorted(ids.tolist()))
        out = x.copy()
        out[np.isin(ids, list(self.ids)), 9] += self.step
        return out


def test_worst_case_counts_the_union_over_components():
    n = 6
    x = np.zeros((n, 11), np.float32)
    x[:, 0], x[:, 10] = 0.2, np.arange(n) / 10  # all class 0 (logit 0.2), ids 0..5
    x[5, 3] = 0.5  # id 5 is misclassified clean
    y = np.eye(10, dtype=np.float32)[np.zeros(n, int)]
    a, b, c = _BreakIds({0, 1}), _BreakIds({1, 2, 3}), _BreakIds({4}, step=0.5)  # c leaves the 0.3 ball
    wc = WorstCase(_FakeClassifier(), [Component("a", a), Component("b", b), Component("c", c)], eps=0.3)
    adv = wc.generate(x, y)
    assert a.seen == [[0, 1, 2, 3, 4]] and b.seen == [[2, 3, 4]] and c.seen == [[4]]  # only the still robust
    np.testing.assert_array_equal(wc.broken_by, [0, 0, 1, 1, -1, -2])
    wrong = np.argmax(adv[:, :10], 1) != 0
    np.testing.assert_array_equal(wrong, [True, True, True, True, False, True])  # union of a and b, plus id 5
    np.testing.assert_array_equal(adv[4], x[4])  # an out-of-ball "success" is not counted
    assert np.abs(adv - x).max() <= 0.3 + 1e-6


# ------------------------------------------------------------------ end to end, and the fast chain
def test_autoattack_end_to_end_seeded(fn, batch):
    x, y = batch
    spec = get_spec("autoattack:max_iter=5,square_max_iter=20")
    attack = make_attack(spec)
    adv = attack(fn, x, y, seed=3).numpy()
    assert adv.shape == x.shape and np.abs(adv - x).max() <= 0.3 + 1e-5
    assert F.accuracy(fn, adv, y) < F.accuracy(fn, x, y) - 0.4
    np.testing.assert_array_equal(adv, attack(fn, x, y, seed=3).numpy())


def test_autoattack_fast_still_works_and_is_labelled(fn, batch):
    spec = REGISTRY["autoattack_fast"]
    assert (spec.eps, spec.eps_iter, spec.param("square_max_iter")) == (0.3, 0.1, 1000)
    assert "NOT standard AutoAttack" in art_suite.__doc__ and "autoattack_fast" in art_suite.__doc__
    row = next(line for line in DOCS.read_text().splitlines() if line.startswith("| `autoattack_fast`"))
    assert "not standard AutoAttack" in row, row
    built = build_art(spec, _first_pixels, SHAPE, 10)
    assert [c.name for c in built.components] == ["apgd_ce", "apgd_dlr", "square"]
    assert built.components[1].attack.estimator.loss_fn is art_suite._dlr
    assert not any(c.attack.targeted for c in built.components[:2]) and built.components[2].attack.max_iter == 1000
    x, y = batch
    adv = make_attack("autoattack_fast:max_iter=10,square_max_iter=50")(fn, x, y, seed=2).numpy()
    assert np.abs(adv - x).max() <= 0.3 + 1e-5
    assert F.accuracy(fn, adv, y) < F.accuracy(fn, x, y) - 0.4
