"""The ATM loss of SegViT (SegViT Sec. 3.2, Eq. (4); weights as the release's `ATMLoss`).

No Hungarian matching: query c is tied to class c. Per output (final and each auxiliary):
  - cross-entropy over K + 1 logits for all queries, target c if class c is present else
    no-object, weighted mean with the no-object weight;
  - for present classes only: sigmoid focal loss (mean over pixels) and dice loss, both summed
    over masks and divided by the number of present masks in the global batch (at least 1).
Pixels labelled `ignore_index` are negatives for every mask (the reference behaviour) unless
`ignore_in_masks` is set, which excludes them from focal and dice.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from segvit_jax.models.layers import upsample_masks


def class_targets(labels: jax.Array, num_classes: int):
  """(B, H, W) int labels -> one-hot masks (B, K, H, W) float32 and presence (B, K) bool.
  Ignore pixels (any id outside [0, K)) belong to no mask."""
  masks = (labels[:, None] == jnp.arange(num_classes)[None, :, None, None]).astype(jnp.float32)
  return masks, masks.max(axis=(2, 3)) > 0


def classification_loss(class_logits: jax.Array, present: jax.Array,
                        no_object_weight: float) -> jax.Array:
  """Weighted-mean cross-entropy; (B, K, K + 1) logits, (B, K) presence."""
  k = class_logits.shape[1]
  target = jnp.where(present, jnp.arange(k)[None], k)
  logp = jax.nn.log_softmax(class_logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
  w = jnp.where(present, 1.0, no_object_weight)
  return jnp.sum(w * nll) / jnp.sum(w)


def sigmoid_focal(logits: jax.Array, targets: jax.Array, valid: jax.Array,
                  alpha: float, gamma: float) -> jax.Array:
  """Per-mask sigmoid focal loss averaged over valid pixels: (B, K, H, W) -> (B, K)."""
  p = jax.nn.sigmoid(logits)
  ce = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  p_t = p * targets + (1 - p) * (1 - targets)
  # An integer gamma (2 in every recipe) as repeated products: a float power is exp(log).
  loss = ce * (1 - p_t) ** (int(gamma) if float(gamma).is_integer() else gamma)
  if alpha >= 0:
    loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
  return jnp.sum(loss * valid, axis=(2, 3)) / jnp.maximum(jnp.sum(valid, axis=(2, 3)), 1.0)


def dice(logits: jax.Array, targets: jax.Array, valid: jax.Array) -> jax.Array:
  """Per-mask dice loss 1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1): (B, K, H, W) -> (B, K)."""
  p = jax.nn.sigmoid(logits) * valid
  t = targets * valid
  num = 2 * jnp.sum(p * t, axis=(2, 3)) + 1
  den = jnp.sum(p, axis=(2, 3)) + jnp.sum(t, axis=(2, 3)) + 1
  return 1 - num / den


def atm_loss(outputs: Mapping[str, Any], labels: jax.Array, *, num_classes: int,
             ce_weight: float, no_object_weight: float, focal_weight: float,
             focal_alpha: float, focal_gamma: float, dice_weight: float,
             ignore_in_masks: bool, ignore_index: int
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total loss and its weighted terms: `loss_ce`, `loss_mask` (focal), `loss_dice` for the
  final output and `loss_ce_{i}` etc. for auxiliary output i. The weights, focal alpha / gamma
  and the no-object weight are the config's (`config.loss`; SegViT's in its configs).

  `outputs`: the segmentor's dict (`class_logits`, `mask_logits`, `aux_outputs`).
  `labels`: (B, H, W) int, `ignore_index` for unlabelled pixels.
  """
  labels = labels.astype(jnp.int32)
  targets, present = class_targets(labels, num_classes)
  if ignore_in_masks:
    valid = (labels != ignore_index).astype(jnp.float32)[:, None]
  else:
    valid = jnp.ones_like(labels, jnp.float32)[:, None]
  present_f = present.astype(jnp.float32)
  num_masks = jnp.maximum(jnp.sum(present_f), 1.0)

  def terms(out):
    masks = out["mask_logits"].astype(jnp.float32)
    masks = upsample_masks(masks, labels.shape[1:])
    focal = sigmoid_focal(masks, targets, valid, focal_alpha, focal_gamma)
    return {
        "loss_ce": ce_weight * classification_loss(out["class_logits"], present,
                                                   no_object_weight),
        "loss_mask": focal_weight * jnp.sum(focal * present_f) / num_masks,
        "loss_dice": dice_weight * jnp.sum(dice(masks, targets, valid) * present_f) / num_masks,
    }

  losses = terms(outputs)
  for i, aux in enumerate(outputs.get("aux_outputs", ())):
    losses.update({f"{name}_{i}": v for name, v in terms(aux).items()})
  return sum(losses.values()), losses


# Gradient accumulation needs the loss's normalisation: the cross-entropy is a mean weighted by
# 1 (class present) or `no_object_weight` (absent) over all queries of the batch; focal and dice
# are divided by the number of present masks in the batch (at least 1). Each term -> (its
# normaliser in `atm_normalisers`, the floor `atm_loss` applies to it).
TERM_NORMALISERS = {"loss_ce": ("queries", 0.0), "loss_mask": ("masks", 1.0),
                    "loss_dice": ("masks", 1.0)}


def atm_normalisers(labels: jax.Array, num_classes: int, no_object_weight: float
                    ) -> dict[str, jax.Array]:
  """The un-floored denominators of the `atm_loss` terms for `labels` (B, H, W): the summed
  no-object-weighted query count and the number of present masks. Both add up over
  micro-batches, unlike the loss terms they divide.

  Presence as in `class_targets` (a class is present if a pixel has its id; other ids belong
  to no class), from per-image pixel counts rather than the (B, K, H, W) one-hot."""
  k = num_classes
  flat = labels.reshape(labels.shape[0], -1).astype(jnp.int32)
  flat = jnp.where((flat >= 0) & (flat < k), flat, k)  # ignore / out-of-range -> bin k
  present = jax.vmap(lambda x: jnp.bincount(x, length=k + 1))(flat)[:, :k] > 0  # (B, K)
  weights = jnp.where(present, 1.0, no_object_weight)
  return {"queries": jnp.sum(weights), "masks": jnp.sum(present.astype(jnp.float32))}
