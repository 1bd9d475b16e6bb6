"""Attacks for MID: a registry of named CleverHans / ART attacks and the training Attacker Pool.

  make_attack(spec_or_name) -> fn(model_fn, x, y, seed=None) -> x_adv      (crafting.py)
  REGISTRY, get_spec('pgd40:eps=0.2'), parse_attack_list('pgd40,mim40_t0')  (registry.py)
  AttackPool(names, seed, num_meta_train): sample(step), sample_tf(step), craft_all(model_fn, x, y, step)
See docs/attacks.md.
"""

from mid_tf.attacks.crafting import attack_labels, make_attack
from mid_tf.attacks.pool import AttackPool
from mid_tf.attacks.registry import REGISTRY, AttackSpec, get_spec, parse_attack_list

__all__ = ["REGISTRY", "AttackPool", "AttackSpec", "attack_labels", "get_spec",
           "make_attack", "parse_attack_list"]
