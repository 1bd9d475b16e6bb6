"""What a robustness report is about: `ReportInput`, the one argument of `report.build_report`."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class UnseenSource:
    """A transfer source that took no part in MID's training (another architecture, another seed): the
    paper crafts its test attacks on the very target MID trained on, which says nothing of a source it never
    saw. name: its key in the memo and in report.json; model: Keras model or logits function; label: how
    report.md titles its rows ("surrogate CNN, seed+1000")."""
    name: str
    model: Any
    label: str


@dataclasses.dataclass(frozen=True, eq=False)
class ReportInput:
    """The models, the test images and the attacks of one report.

    models            name -> Keras model or logits function; must include `target`
    x, y              test images (uint8 0..255 or float 0..1) and their labels
    attacks           transfer attacks (crafted once on `target`, classified by every model)
    unseen_source     a further transfer source every `attacks` entry is also crafted on (None: none)
    whitebox_attacks  attacks crafted on each model itself (None: the same as `attacks`)
    pool              the MID training pool (names or the pool string's names): known vs unknown
    regenerator       x -> D_t(E_s(x)) (or D_s(E_s(x)), stage regen) for the regeneration metrics and the image
                      grids (optional); `regenerator_label` names it in the report
    slow_examples     images for the eager-only attacks (CW, SPSA, ART's)
    shard_examples    images per white-box piece (evaluation/pieces.py): the unit workers share and a stopped
                      evaluation keeps
    eps_sweep         eps values of the white-box `sweep_attack` sanity sweep (empty: no sweep)
    dataset, config   recorded in the report as they are
    grid_attacks      base names of the transfer attacks whose clean | adversarial | regenerated
                      grid of `grid_images` images is drawn
    """
    models: Mapping[str, Any]
    x: np.ndarray
    y: np.ndarray
    attacks: Sequence[str]
    whitebox_attacks: Sequence[str] | None = None
    unseen_source: UnseenSource | None = None
    pool: Sequence[str] = ()
    target: str = "target"
    regenerator: Callable | None = None
    regenerator_label: str = "D_t(E_s(.))"
    slow_examples: int = 1000
    shard_examples: int = 1000
    seed: int = 0
    eps_sweep: Sequence[float] = (0.1, 0.2, 0.3, 1.0)
    sweep_attack: str = "pgd40"
    dataset: str = "mnist"
    config: Mapping[str, Any] | None = None
    batch_size: int = 500
    grid_attacks: Sequence[str] = ()
    grid_images: int = 8

    @property
    def whitebox(self) -> list[str]:
        """The white-box attacks (`attacks` when none are given)."""
        return list(self.attacks if self.whitebox_attacks is None else self.whitebox_attacks)
