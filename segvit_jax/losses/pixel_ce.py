"""Per-pixel cross-entropy of per-pixel classifiers (SegFormer's all-MLP head; mmseg's
`CrossEntropyLoss` as the SegFormer release trains with; SegFormer Sec. 4.1).

The logits (B, K, h, w) are bilinearly resized (align_corners=False) to the label size first,
as mmseg's decode head does. Pixels labelled `ignore_index` contribute nothing; mmseg 0.x then
averages over ALL pixels of the batch (`avg_non_ignore=False`, what the papers trained with),
or over the labelled ones with `avg_non_ignore=True` (mmseg >= 0.23's option).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from segvit_jax.models.layers import resize_grid


def pixel_cross_entropy(logits: jax.Array, labels: jax.Array, ignore_index: int,
                        avg_non_ignore: bool) -> jax.Array:
  """Mean cross-entropy of (B, K, h, w) logits against (B, H, W) int labels.

  Computed channels last, (B, H, W, K), as logsumexp - the label's logit: XLA's CPU reductions
  over the major class axis of (B, K, H, W) are slower for the loss and its gradient
  (BENCHMARKS.md, "Training step")."""
  labels = labels.astype(jnp.int32)
  k = logits.shape[1]
  logits = jnp.transpose(logits.astype(jnp.float32), (0, 2, 3, 1))
  logits = resize_grid(logits, labels.shape[1:], "bilinear", axes=(1, 2))
  valid = (labels != ignore_index) & (labels >= 0) & (labels < k)
  picked = jnp.sum(jnp.where(jnp.arange(k) == labels[..., None], logits, 0.0), axis=-1)
  nll = jax.nn.logsumexp(logits, axis=-1) - picked
  total = jnp.sum(jnp.where(valid, nll, 0.0))
  denom = jnp.sum(valid) if avg_non_ignore else labels.size
  return total / jnp.maximum(denom, 1)


def pixel_ce_loss(outputs: Mapping[str, Any], labels: jax.Array, *, num_classes: int,
                  ignore_index: int, ce_weight: float,
                  avg_non_ignore: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total loss and its terms ({"loss_ce"}) of a segmentor's `logits` (B, K, h, w)."""
  if outputs["logits"].shape[1] != num_classes:
    raise ValueError(f"the model gives {outputs['logits'].shape[1]} classes, "
                     f"num_classes={num_classes}")
  loss = ce_weight * pixel_cross_entropy(outputs["logits"], labels, ignore_index,
                                         avg_non_ignore)
  return loss, {"loss_ce": loss}


def pixel_ce_normalisers(labels: jax.Array, num_classes: int, ignore_index: int,
                         avg_non_ignore: bool) -> dict[str, jax.Array]:
  """The un-floored denominator of `pixel_ce_loss` for `labels` (B, H, W): all pixels, or the
  labelled ones with `avg_non_ignore`; it adds up over micro-batches."""
  if not avg_non_ignore:
    return {"pixels": jnp.asarray(labels.size, jnp.float32)}
  labels = labels.astype(jnp.int32)
  valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
  return {"pixels": jnp.sum(valid).astype(jnp.float32)}


TERM_NORMALISERS = {"loss_ce": ("pixels", 1.0)}
