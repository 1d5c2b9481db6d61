"""AdamW with the papers' recipes. Every number comes from `config.optim`:

  schedule "warmup_poly" (SegViT, SegFormer; mmcv semantics): linear warm-up over
           `warmup_steps` from `warmup_ratio` x lr, then poly decay with `poly_power`;
           "two_stage" (EoMT App. A.2, "Learning rate warm-up."): the new parameters warm up
           linearly over `warmup_steps` while the backbone stays at lr 0, then the backbone
           warms up linearly over `backbone_warmup_steps`; each then decays as
           (1 - t' / T') ** poly_power over its own remaining steps (the release's
           TwoStageWarmupPolySchedule).
  lr_mults       a learning-rate multiplier per top-level module (SegViT's decoder x10);
  layer_decay    layer-wise lr decay of the ViT backbone (EoMT 0.8): block i of L gets
                 decay ** (L - 1 - i), the patch / position embedding, cls and registers block
                 0's factor, the final norm and everything outside the backbone 1; None: off;
  layer_decay_skip_last
                 the last N blocks keep the full lr while the others decay as above (the EoMT
                 release's DINOv3 recipes, `llrd_l2_enabled: False`: no decay on the L2 blocks
                 that see the queries); 0: every block decays;
  no_decay       regexes of parameter paths without weight decay (backbone LayerNorms);
  clip_norm      gradient clipping by global norm (0: none).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax


def warmup_poly_schedule(base_lr: float, total_steps: int, warmup_steps: int,
                         warmup_ratio: float, power: float,
                         min_lr: float) -> Callable[[jax.Array], jax.Array]:
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


def two_stage_schedules(base_lr: float, total_steps: int, warmup_steps: int,
                        backbone_warmup_steps: int, power: float
                        ) -> tuple[Callable[[jax.Array], jax.Array],
                                   Callable[[jax.Array], jax.Array]]:
  """EoMT's two-stage warm-up + poly: (schedule of the new parameters, of the backbone), as
  functions of the 0-based step t. New: base * t / w1 for t < w1, then
  base * (1 - (t - w1) / (T - w1)) ** power. Backbone: 0 for t < w1, base * (t - w1) / w2 for
  t < w1 + w2, then base * (1 - (t - w1 - w2) / (T - w1 - w2)) ** power."""
  w1, w2 = int(warmup_steps), int(backbone_warmup_steps)

  def poly(t, start):  # 1 - progress written without cancellation near the end
    remaining = (total_steps - jnp.maximum(t, start)) / max(1, total_steps - start)
    return base_lr * jnp.clip(remaining, 0.0, 1.0) ** power

  def new(step):
    t = jnp.asarray(step, jnp.float32)
    if w1 <= 0:
      return poly(t, 0)
    return jnp.where(t < w1, base_lr * t / w1, poly(t, w1))

  def backbone(step):
    t = jnp.asarray(step, jnp.float32)
    ramp = base_lr * (t - w1) / max(w2, 1)
    return jnp.where(t < w1, 0.0, jnp.where(t < w1 + w2, ramp, poly(t, w1 + w2)))

  return new, backbone


_BLOCK = re.compile(r"encoderblock_(\d+)")
# Backbone parameters before the first block: they take block 0's layer-decay factor.
_EMBEDDING = ("embedding", "pos_embedding", "cls", "registers")


def layer_decay_factor(path: str, depth: int, decay: float | None, skip_last: int = 0
                       ) -> float:
  """The layer-wise lr factor of a '/'-joined parameter path (see the module docstring): the
  last `skip_last` of the `depth` blocks keep factor 1."""
  parts = path.split("/")
  if decay is None or parts[0] != "backbone":
    return 1.0
  m = _BLOCK.fullmatch(parts[1]) if len(parts) > 1 else None
  if m:
    block = int(m[1])
    return 1.0 if block >= depth - skip_last else float(decay) ** (depth - 1 - block)
  if len(parts) > 1 and parts[1] in _EMBEDDING:
    return float(decay) ** (depth - 1)
  return 1.0


def backbone_depth(params: Any) -> int:
  """The number of `encoderblock_{i}` blocks under params["backbone"] (0 without any)."""
  names = params.get("backbone", {}) if isinstance(params, Mapping) else {}
  return sum(1 for k in names if _BLOCK.fullmatch(str(k)))


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def lr_factors(params: Any, lr_mults: Mapping[str, float], layer_decay: float | None = None,
               skip_last: int = 0) -> Any:
  """The learning-rate factor of every parameter: its top-level module's multiplier times
  its layer-decay factor (the last `skip_last` blocks undecayed)."""
  depth = backbone_depth(params)
  if not 0 <= skip_last <= depth:
    raise ValueError(f"config.optim.layer_decay_skip_last={skip_last}: expected 0 to the "
                     f"backbone's {depth} blocks")

  def factor(path, _):
    name = _path_str(path)
    return float(lr_mults.get(name.split("/")[0], 1.0)) * layer_decay_factor(
        name, depth, layer_decay, skip_last)

  return jax.tree_util.tree_map_with_path(factor, params)


def decay_mask(params: Any, no_decay: Sequence[str]) -> Any:
  """True where weight decay applies: parameters whose '/'-joined path matches none of the
  `no_decay` regular expressions."""
  patterns = [re.compile(p) for p in no_decay]
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any(p.search(_path_str(path)) for p in patterns), params)


def make_optimizer(optim_cfg: ml_collections.ConfigDict, total_steps: int, params: Any
                   ) -> tuple[optax.GradientTransformation, Callable]:
  """Returns (tx, schedule): the schedule is the base learning rate of the parameters outside
  the backbone (what the trainer logs as `lr`). `params` may be abstract (only the tree
  structure is read); the backbone's blocks must be unstacked (`encoderblock_{i}`) when
  `layer_decay` is set."""
  c = optim_cfg
  kind = c.schedule
  if kind == "warmup_poly":
    schedule = backbone_schedule = warmup_poly_schedule(
        c.lr, total_steps, c.warmup_steps, c.warmup_ratio, c.poly_power, c.min_lr)
  elif kind == "two_stage":
    schedule, backbone_schedule = two_stage_schedules(
        c.lr, total_steps, c.warmup_steps, c.backbone_warmup_steps, c.poly_power)
  else:
    raise ValueError(f"config.optim.schedule={kind!r}: expected 'warmup_poly' or 'two_stage'")
  layer_decay = c.layer_decay
  if layer_decay is not None and isinstance(params, Mapping) and "encoderblock" in params.get(
      "backbone", {}):
    raise ValueError("config.optim.layer_decay needs the backbone's blocks unstacked: "
                     "set model.backbone.scan_layers=False")
  factors = lr_factors(params, dict(c.lr_mults), layer_decay, int(c.layer_decay_skip_last))
  # One learning-rate transform per (schedule, factor) pair that occurs.
  def label(path, factor):
    group = "backbone" if _path_str(path[:1]) == "backbone" else "other"
    return f"{group}:{factor!r}"
  labels = jax.tree_util.tree_map_with_path(label, factors)
  scalers = {}
  for name in sorted(set(jax.tree.leaves(labels))):  # sorted: the same program everywhere
    group, factor = name.split(":")
    sched = backbone_schedule if group == "backbone" else schedule
    scalers[name] = optax.scale_by_learning_rate(
        lambda s, f=float(factor), sched=sched: f * sched(s))
  tx = optax.chain(
      optax.clip_by_global_norm(c.clip_norm) if c.clip_norm > 0 else optax.identity(),
      optax.scale_by_adam(b1=c.b1, b2=c.b2, eps=c.eps),
      optax.add_decayed_weights(c.weight_decay, mask=decay_mask(params, c.no_decay)),
      optax.multi_transform(scalers, labels),
  )
  return tx, schedule
