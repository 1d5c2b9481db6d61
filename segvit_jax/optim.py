"""AdamW with the SegViT recipe (spec segvit.md, "Training recipes"): poly decay with linear
warm-up (mmcv semantics), a learning-rate multiplier per top-level module (decoder x10), no
weight decay on the parameters matching `no_decay` patterns (backbone LayerNorms), gradient
clipping by global norm. Every number comes from `config.optim`.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax


def warmup_poly_schedule(base_lr: float, total_steps: int, warmup_steps: int = 0,
                         warmup_ratio: float = 1e-6, power: float = 1.0,
                         min_lr: float = 0.0) -> Callable[[jax.Array], jax.Array]:
  """mmcv's poly policy with linear warm-up, evaluated at the 0-based iteration `step`:
  regular = (base - min) * (1 - step / total) ** power + min;
  during warm-up lr = regular * (1 - (1 - step / warmup) * (1 - warmup_ratio))."""

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    remaining = jnp.clip((total_steps - step) / total_steps, 0.0, 1.0)  # = 1 - progress
    regular = (base_lr - min_lr) * remaining**power + min_lr
    if warmup_steps <= 0:
      return regular
    # 1 - k with k = (1 - step / warmup) * (1 - ratio), written without cancellation.
    factor = warmup_ratio + (step / warmup_steps) * (1.0 - warmup_ratio)
    return jnp.where(step < warmup_steps, regular * factor, regular)

  return schedule


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def param_labels(params: Any, lr_mults: Mapping[str, float]) -> Any:
  """Labels each parameter with its top-level module name when it has an lr multiplier,
  else 'default'."""
  def label(path, _):
    top = _path_str(path[:1])
    return top if top in lr_mults else "default"
  return jax.tree_util.tree_map_with_path(label, params)


def decay_mask(params: Any, no_decay: Sequence[str]) -> Any:
  """True where weight decay applies: parameters whose '/'-joined path matches none of the
  `no_decay` regular expressions."""
  patterns = [re.compile(p) for p in no_decay]
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any(p.search(_path_str(path)) for p in patterns), params)


def make_optimizer(optim_cfg: ml_collections.ConfigDict, total_steps: int, params: Any
                   ) -> tuple[optax.GradientTransformation, Callable]:
  """Returns (tx, schedule); `params` may be abstract (only the tree structure is read)."""
  c = optim_cfg
  schedule = warmup_poly_schedule(c.lr, total_steps, c.warmup_steps, c.warmup_ratio,
                                  c.poly_power, c.min_lr)
  lr_mults = dict(c.lr_mults)
  scalers = {"default": optax.scale_by_learning_rate(schedule)}
  for name, mult in lr_mults.items():
    scalers[name] = optax.scale_by_learning_rate(lambda s, m=mult: m * schedule(s))
  tx = optax.chain(
      optax.clip_by_global_norm(c.clip_norm) if c.clip_norm > 0 else optax.identity(),
      optax.scale_by_adam(b1=c.b1, b2=c.b2, eps=c.eps),
      optax.add_decayed_weights(c.weight_decay, mask=decay_mask(params, c.no_decay)),
      optax.multi_transform(scalers, param_labels(params, lr_mults)),
  )
  return tx, schedule
