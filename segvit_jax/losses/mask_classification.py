"""Mask2Former's set loss for mask classification (Cheng et al. 2022, "Masked-attention Mask
Transformer for Universal Image Segmentation": section 3.3, the point-sampled mask loss, and
4.1, the loss weights), as EoMT trains with it (EoMT App. A.2, "Loss function.", Eq. (2)).

Per output (the final prediction and each auxiliary one, each matched on its own):
  - Hungarian matching per image of the Q queries to the ground-truth segments, cost
    `class_weight x -p(target class) + mask_weight x sigmoid BCE + dice_weight x dice`, the
    mask costs on `num_points` points drawn uniformly (the same for predictions and targets),
    without gradients (Mask2Former's `HungarianMatcher`);
  - `loss_ce`: cross-entropy over K + 1 logits for every query, unmatched ones -> no-object
    class K, weighted mean with the no-object weight (0.1 in the EoMT configs);
  - `loss_mask`, `loss_dice`: sigmoid BCE (mean over points) and dice of each matched mask at
    `num_points` points chosen by uncertainty (PointRend's importance sampling, Kirillov et al.
    2020, section 3.1: oversample, keep the most uncertain, add uniform ones), summed over
    masks and divided by a count of the (global) batch, at least 1: `mask_normalizer`
    (`config.loss.mask_normalizer`) "valid_targets", every ground-truth mask (Mask2Former's
    `SetCriterion`, transformers' `Mask2FormerLoss`), or "matched_targets", the matched ones
    only (the EoMT release's `MaskClassificationLoss.loss_masks`, which counts the matcher's
    pairs). They differ when an image has more targets than queries.

Points are in [0, 1]^2 image coordinates, so predictions (B, Q, h, w) and targets at the label
resolution are sampled at the same places without resizing either. Targets are a dense
(B, M, H, W) mask stack, or `LabelMasks` (a label map and one class per target) that sample
masks `labels == class` straight from the labels: semantic segmentation's one mask per class
present never builds its (B, K, H, W) one-hot. Only min(M, Q) matched masks are sampled.
Panoptic segmentation's targets (every thing instance and stuff region) come the same way from
a segment-index map (`panoptic_targets`, `mask2former_panoptic_loss`); overlapping instances
(COCO instances) from L stacked maps, each target the union over the layers of its index.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from segvit_jax.losses.atm import dice
from segvit_jax.losses.matching import linear_sum_assignment

_HIGHEST = jax.lax.Precision.HIGHEST


class LabelMasks(NamedTuple):
  """Target m of image b is the mask `labels[b] == classes[b, m]`; `labels` (B, H, W) int with
  -1 (or any id no target has) for pixels in no mask, `classes` (B, M) int. `labels` may be
  (B, H, W, L), L label maps: the mask is then the union over l of `labels[b, ..., l] ==
  classes[b, m]` (layered segment maps of overlapping instances)."""

  labels: jax.Array
  classes: jax.Array


Targets = jax.Array | LabelMasks  # dense (B, M, H, W) masks, or masks by label


# --------------------------------------------------------------------------- point sampling


def _bilinear_taps(coords: jax.Array, height: int, width: int
                   ) -> list[tuple[jax.Array, jax.Array]]:
  """The four (flat pixel index, weight) taps of torch `grid_sample(align_corners=False,
  padding_mode="zeros")` at `coords` (..., 2) = (x, y) in [0, 1]: a tap outside the image has
  weight 0 (its index is clipped into range)."""
  x = coords[..., 0].astype(jnp.float32) * width - 0.5
  y = coords[..., 1].astype(jnp.float32) * height - 0.5
  x0, y0 = jnp.floor(x), jnp.floor(y)
  fx, fy = x - x0, y - y0
  taps = []
  for dy, wy in ((0, 1 - fy), (1, fy)):
    for dx, wx in ((0, 1 - fx), (1, fx)):
      xi, yi = (x0 + dx).astype(jnp.int32), (y0 + dy).astype(jnp.int32)
      inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
      index = jnp.clip(yi, 0, height - 1) * width + jnp.clip(xi, 0, width - 1)
      taps.append((index, jnp.where(inside, wx * wy, 0.0)))
  return taps


def sample_channels(values: jax.Array, channels: jax.Array, coords: jax.Array) -> jax.Array:
  """Bilinear samples of channel `channels[b, s]` of `values` (B, C, H, W) at `coords[b, s]`:
  (B, S) channels, (B, S or 1, P, 2) coords -> (B, S, P), as `point_sample` per channel."""
  b, c, h, w = values.shape
  flat = values.reshape(b, c * h * w)
  base = channels.astype(jnp.int32)[:, :, None] * (h * w)  # (B, S, 1)
  out = 0.0
  for index, weight in _bilinear_taps(coords, h, w):
    index = base + index  # (B, S, P)
    taken = jnp.take_along_axis(flat, index.reshape(b, -1), axis=1).reshape(index.shape)
    out = out + taken * weight
  return out


def point_sample(masks: jax.Array, coords: jax.Array) -> jax.Array:
  """detectron2's `point_sample`: (B, Q, H, W) masks at (B, P, 2) points (x, y) in [0, 1] ->
  (B, Q, P), i.e. torch `grid_sample(masks, 2 * coords - 1, align_corners=False)`, zero
  outside the image."""
  b, q = masks.shape[:2]
  channels = jnp.broadcast_to(jnp.arange(q), (b, q))
  return sample_channels(masks.astype(jnp.float32), channels, coords[:, None])


def sample_targets(targets: Targets, index: jax.Array, coords: jax.Array) -> jax.Array:
  """Target masks `index` (B, S) at `coords` (B, S or 1, P, 2) -> (B, S, P) float32, bilinear
  as `point_sample` of the float masks."""
  if not isinstance(targets, LabelMasks):
    return sample_channels(targets.astype(jnp.float32), index, coords)
  labels, classes = targets
  b, h, w = labels.shape[:3]
  wanted = jnp.take_along_axis(classes.astype(jnp.int32), index, axis=1)[:, :, None]
  out = 0.0
  if labels.ndim == 4:  # (B, H, W, L) layers: a pixel is in the mask if any layer says so
    layers = labels.shape[3]
    flat = labels.reshape(b, h * w, layers).astype(jnp.int32)
    for pixel, weight in _bilinear_taps(coords, h, w):  # (B, S or 1, P)
      label = jnp.take_along_axis(flat, pixel.reshape(b, -1, 1), axis=1).reshape(
          *pixel.shape, layers)
      out = out + jnp.where(jnp.any(label == wanted[..., None], axis=-1), weight, 0.0)
    return out
  flat = labels.reshape(b, h * w).astype(jnp.int32)
  for pixel, weight in _bilinear_taps(coords, h, w):  # (B, S or 1, P)
    label = jnp.take_along_axis(flat, pixel.reshape(b, -1), axis=1).reshape(pixel.shape)
    out = out + jnp.where(label == wanted, weight, 0.0)
  return out


def uncertain_point_coords(rng: jax.Array, point_logits: Callable[[jax.Array], jax.Array],
                           shape: tuple[int, ...], num_points: int, oversample_ratio: float,
                           importance_ratio: float) -> jax.Array:
  """Mask2Former's `get_uncertain_point_coords_with_randomness`: (*shape, num_points, 2)
  points, the int(importance_ratio * num_points) most uncertain (uncertainty -|logit|) of
  int(oversample_ratio * num_points) uniform candidates first, then uniform ones.
  `point_logits(coords (*shape, P', 2)) -> (*shape, P')` gives the mask logits at points."""
  num_candidates = int(num_points * oversample_ratio)
  num_uncertain = int(importance_ratio * num_points)
  k_candidates, k_random = jax.random.split(rng)
  candidates = jax.random.uniform(k_candidates, (*shape, num_candidates, 2))
  uncertainty = -jnp.abs(jax.lax.stop_gradient(point_logits(candidates)))
  _, top = jax.lax.top_k(uncertainty, num_uncertain)
  chosen = jnp.take_along_axis(candidates, top[..., None], axis=-2)
  uniform = jax.random.uniform(k_random, (*shape, num_points - num_uncertain, 2))
  return jnp.concatenate([chosen, uniform], axis=-2)


# --------------------------------------------------------------------------- matching


def matching_cost(class_logits: jax.Array, point_logits: jax.Array, target_classes: jax.Array,
                  target_points: jax.Array, *, class_weight: float,
                  mask_weight: float, dice_weight: float) -> jax.Array:
  """Mask2Former's `HungarianMatcher` cost (B, Q, M) of query q for target m from the class
  logits (B, Q, K + 1), the mask logits at P points (B, Q, P) and the targets' values at the
  same points (B, M, P): -softmax probability of the target class, the mean sigmoid BCE
  (`batch_sigmoid_ce_loss`) and the dice loss with +1 smoothing (`batch_dice_loss`)."""
  num_points = point_logits.shape[-1]
  prob = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)
  classes = jnp.clip(target_classes.astype(jnp.int32), 0, prob.shape[-1] - 1)
  cost_class = -jnp.take_along_axis(prob, classes[:, None, :], axis=2)  # (B, Q, M)

  x = point_logits.astype(jnp.float32)
  t = target_points.astype(jnp.float32)
  einsum = lambda a, b: jnp.einsum("bqp,bmp->bqm", a, b, precision=_HIGHEST)  # noqa: E731
  pos, neg = jax.nn.softplus(-x), jax.nn.softplus(x)  # BCE against 1 and against 0
  cost_mask = (einsum(pos, t) + einsum(neg, 1 - t)) / num_points
  p = jax.nn.sigmoid(x)
  denominator = jnp.sum(p, -1)[:, :, None] + jnp.sum(t, -1)[:, None, :]
  cost_dice = 1 - (2 * einsum(p, t) + 1) / (denominator + 1)
  return class_weight * cost_class + mask_weight * cost_mask + dice_weight * cost_dice


def output_matching_cost(output: Mapping[str, Any], targets: Targets,
                         target_classes: jax.Array, rng: jax.Array, num_points: int,
                         class_weight: float, mask_weight: float,
                         dice_weight: float) -> jax.Array:
  """`matching_cost` (B, Q, M) of one output at `num_points` uniform points per image."""
  masks = jax.lax.stop_gradient(output["mask_logits"]).astype(jnp.float32)
  b, m = target_classes.shape
  coords = jax.random.uniform(rng, (b, num_points, 2))
  target_points = sample_targets(targets, jnp.broadcast_to(jnp.arange(m), (b, m)),
                                 coords[:, None])
  return matching_cost(jax.lax.stop_gradient(output["class_logits"]),
                       point_sample(masks, coords), target_classes, target_points,
                       class_weight=class_weight, mask_weight=mask_weight,
                       dice_weight=dice_weight)


def hungarian_match(cost: jax.Array, target_valid: jax.Array) -> jax.Array:
  """Per-image optimal matching of (..., B, Q, M) costs: the query of each target
  (..., B, M), -1 for invalid targets (and unmatched ones, if more targets than queries)."""
  solve = lambda c, v: linear_sum_assignment(c, v)[0]  # noqa: E731
  for _ in range(cost.ndim - 2):
    solve = jax.vmap(solve)
  valid = jnp.broadcast_to(target_valid, cost.shape[:-2] + target_valid.shape[-1:])
  return solve(jax.lax.stop_gradient(cost).astype(jnp.float32), valid)


# --------------------------------------------------------------------------- losses

# What `loss_mask` and `loss_dice` are divided by (`config.loss.mask_normalizer`), floored at 1
# either way. Mask2Former's criterion counts every ground-truth mask of the batch; the EoMT
# release's (its `MaskClassificationLoss.loss_masks`) counts the matched pairs, at most Q per
# image. Both sum the count over the data-parallel processes and divide by their number, then
# floor it at 1; the loss here spans the global batch, so it takes the global count (the same
# but for the floor: 1 here, against one pair per process there).
MASK_NORMALIZERS = {
    "valid_targets": "every ground-truth mask: Mask2Former, transformers' Mask2FormerLoss",
    "matched_targets": "the matched masks, min(masks, queries) per image: the EoMT release",
}


def check_mask_normalizer(mask_normalizer: str) -> str:
  """`mask_normalizer` if it is a key of `MASK_NORMALIZERS`, else one message naming the
  config key, the value and the choices."""
  if mask_normalizer not in MASK_NORMALIZERS:
    choices = "; ".join(f"{k!r} ({v})" for k, v in MASK_NORMALIZERS.items())
    raise ValueError(f"config.loss.mask_normalizer={mask_normalizer!r}: expected one of "
                     f"{choices}")
  return mask_normalizer


def mask_count(query_for_target: jax.Array, target_valid: jax.Array,
               mask_normalizer: str) -> jax.Array:
  """The denominator of `loss_mask` and `loss_dice` for one output's matching
  `query_for_target` (B, M) (-1: unmatched) of the targets `target_valid` (B, M): the number
  of valid targets ("valid_targets") or of matched ones ("matched_targets"), at least 1."""
  if check_mask_normalizer(mask_normalizer) == "valid_targets":
    counted = target_valid.astype(bool)
  else:
    counted = query_for_target >= 0
  return jnp.maximum(jnp.sum(counted.astype(jnp.float32)), 1.0)


def sigmoid_bce(point_logits: jax.Array, point_targets: jax.Array) -> jax.Array:
  """Per-mask sigmoid BCE, mean over points: (..., P) -> (...)."""
  x = point_logits
  return jnp.mean(jnp.maximum(x, 0) - x * point_targets + jnp.log1p(jnp.exp(-jnp.abs(x))), -1)


def losses_for_assignment(output: Mapping[str, Any], targets: Targets,
                          target_classes: jax.Array, query_for_target: jax.Array,
                          num_masks: jax.Array, *, point_coords: jax.Array | None = None,
                          rng: jax.Array | None = None, num_points: int,
                          oversample_ratio: float, importance_ratio: float,
                          no_object_weight: float, class_weight: float,
                          mask_weight: float, dice_weight: float) -> dict[str, jax.Array]:
  """`loss_ce`, `loss_mask`, `loss_dice` of one output for a given matching.

  `output`: `class_logits` (B, Q, K + 1), `mask_logits` (B, Q, h, w). `query_for_target`
  (B, M): the query matched to each target, -1 for none (padding). `num_masks`: the
  denominator of the mask losses. The mask losses are taken at `point_coords` (B, M, P, 2)
  (x, y) in [0, 1], per target, if given, else at points chosen by `uncertain_point_coords`
  from the matched query's logits with `rng`.
  """
  class_logits = output["class_logits"].astype(jnp.float32)
  mask_logits = output["mask_logits"].astype(jnp.float32)
  b, q, k1 = class_logits.shape
  m = query_for_target.shape[1]
  matched = query_for_target >= 0

  # Cross-entropy: matched queries -> their target's class, the others -> no-object (K).
  target_for_query = jnp.full((b, q), -1, jnp.int32).at[
      jnp.arange(b)[:, None], jnp.where(matched, query_for_target, q)].set(
          jnp.arange(m, dtype=jnp.int32), mode="drop")
  query_class = jnp.where(
      target_for_query >= 0,
      jnp.take_along_axis(target_classes.astype(jnp.int32),
                          jnp.maximum(target_for_query, 0), axis=1), k1 - 1)
  logp = jax.nn.log_softmax(class_logits, axis=-1)
  nll = -jnp.take_along_axis(logp, query_class[..., None], axis=-1)[..., 0]
  weight = jnp.where(target_for_query >= 0, 1.0, no_object_weight)
  loss_ce = jnp.sum(weight * nll) / jnp.sum(weight)

  # Mask losses on the matched pairs only: at most min(M, Q) of them, matched ones first.
  slots = min(m, q)
  slot_target = jnp.argsort(~matched, axis=1, stable=True)[:, :slots].astype(jnp.int32)
  slot_query = jnp.maximum(jnp.take_along_axis(query_for_target, slot_target, axis=1), 0)
  slot_valid = jnp.take_along_axis(matched, slot_target, axis=1).astype(jnp.float32)
  if point_coords is None:
    coords = uncertain_point_coords(
        rng, lambda c: sample_channels(jax.lax.stop_gradient(mask_logits), slot_query, c),
        (b, slots), num_points, oversample_ratio, importance_ratio)
  else:
    coords = jnp.take_along_axis(point_coords, slot_target[:, :, None, None], axis=1)
  point_logits = sample_channels(mask_logits, slot_query, coords)  # (B, S, P)
  point_targets = jax.lax.stop_gradient(sample_targets(targets, slot_target, coords))
  loss_mask = jnp.sum(sigmoid_bce(point_logits, point_targets) * slot_valid) / num_masks
  # atm's dice sums over the last two axes: (B, S, P, 1) -> (B, S).
  per_mask_dice = dice(point_logits[..., None], point_targets[..., None], 1.0)
  loss_dice = jnp.sum(per_mask_dice * slot_valid) / num_masks
  return {"loss_ce": class_weight * loss_ce, "loss_mask": mask_weight * loss_mask,
          "loss_dice": dice_weight * loss_dice}


def mask2former_loss(outputs: Mapping[str, Any], target_masks: Targets,
                     target_classes: jax.Array, target_valid: jax.Array, *, rng: jax.Array,
                     num_points: int, oversample_ratio: float, importance_ratio: float,
                     no_object_weight: float, class_weight: float, mask_weight: float,
                     dice_weight: float, mask_normalizer: str
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total loss and its weighted terms: `loss_ce`, `loss_mask` (BCE), `loss_dice` for the
  final output and `loss_ce_{i}` etc. for auxiliary output i, each matched on its own. The
  point counts and ratios, the weights, the no-object weight and what the mask terms are
  divided by (`mask_normalizer`, `MASK_NORMALIZERS`; counted on each output's own matching)
  are the config's (`config.loss`; Mask2Former's / EoMT's in the EoMT configs).

  `outputs`: `class_logits` (B, Q, K + 1), `mask_logits` (B, Q, h, w), `aux_outputs` (a list
  of dicts with the same keys). `target_masks`: (B, M, H, W) float / bool, or `LabelMasks`;
  `target_classes` (B, M) int in [0, K); `target_valid` (B, M) bool, False for padding.
  The matching runs without gradients; `rng` draws the matching's and the losses' points.
  """
  if rng is None:
    raise ValueError("the Mask2Former loss samples points at random: pass rng=")
  check_mask_normalizer(mask_normalizer)
  target_valid = target_valid.astype(bool)
  each = [outputs, *outputs.get("aux_outputs", ())]
  keys = [jax.random.split(jax.random.fold_in(rng, i)) for i in range(len(each))]
  targets = target_masks
  costs = [output_matching_cost(out, targets, target_classes, key[0], num_points,
                                class_weight, mask_weight, dice_weight)
           for out, key in zip(each, keys)]
  # One solver loop for every output: on an accelerator the loop's steps are sequential.
  if len({c.shape for c in costs}) == 1:
    matches = list(hungarian_match(jnp.stack(costs), target_valid))
  else:
    matches = [hungarian_match(c, target_valid) for c in costs]

  losses = {}
  for i, (out, key, query_for_target) in enumerate(zip(each, keys, matches)):
    num_masks = mask_count(query_for_target, target_valid, mask_normalizer)
    terms = losses_for_assignment(
        out, targets, target_classes, query_for_target, num_masks, rng=key[1],
        num_points=num_points, oversample_ratio=oversample_ratio,
        importance_ratio=importance_ratio, no_object_weight=no_object_weight,
        class_weight=class_weight, mask_weight=mask_weight, dice_weight=dice_weight)
    suffix = "" if i == 0 else f"_{i - 1}"
    losses.update({name + suffix: v for name, v in terms.items()})
  return sum(losses.values()), losses


# --------------------------------------------------------------------------- semantic targets


def _labelled(labels: jax.Array, num_classes: int, ignore_index: int) -> jax.Array:
  """(B, H, W) int32 labels with ignore / out-of-range pixels set to -1 (in no mask)."""
  labels = labels.astype(jnp.int32)
  keep = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
  return jnp.where(keep, labels, -1)


def _present(labels: jax.Array, num_classes: int) -> jax.Array:
  """(B, K) bool: class k has a pixel; from per-image counts, not the one-hot."""
  bins = jnp.where(labels >= 0, labels, num_classes).reshape(labels.shape[0], -1)
  counts = jax.vmap(lambda x: jnp.bincount(x, length=num_classes + 1))(bins)
  return counts[:, :num_classes] > 0


def semantic_targets(labels: jax.Array, num_classes: int, ignore_index: int
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Semantic segmentation as a set of segments: one mask per class. (B, H, W) labels ->
  masks (B, K, H, W) float32 (`labels == k`; ignore pixels are in no mask), classes (B, K)
  = 0..K-1, valid (B, K) bool = the class is present. `mask2former_semantic_loss` samples
  the same masks from the labels without building them."""
  labels = _labelled(labels, num_classes, ignore_index)
  masks = (labels[:, None] == jnp.arange(num_classes)[None, :, None, None])
  classes = jnp.broadcast_to(jnp.arange(num_classes, dtype=jnp.int32),
                             (labels.shape[0], num_classes))
  return masks.astype(jnp.float32), classes, _present(labels, num_classes)


def _check_outputs(outputs: Mapping[str, Any], num_classes: int,
                   num_queries: int | None) -> None:
  _, q, k1 = outputs["class_logits"].shape
  if k1 != num_classes + 1:
    raise ValueError(f"the model gives {k1} class logits, expected num_classes + 1 = "
                     f"{num_classes + 1} (the last is no-object)")
  if num_queries is not None and num_queries != q:
    raise ValueError(f"loss option num_queries={num_queries}, the model gives {q} queries")


def mask2former_semantic_loss(outputs: Mapping[str, Any], labels: jax.Array, *,
                              num_classes: int, ignore_index: int, rng: jax.Array,
                              num_queries: int | None = None, **options
                              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`mask2former_loss` with one target per class present in (B, H, W) `labels`
  (`semantic_targets`), sampled from the labels. `num_queries`, if given (the accumulation
  normaliser needs it), must be the outputs' Q; `options`: those of `mask2former_loss`."""
  _check_outputs(outputs, num_classes, num_queries)
  b = labels.shape[0]
  labels = _labelled(labels, num_classes, ignore_index)
  classes = jnp.broadcast_to(jnp.arange(num_classes, dtype=jnp.int32), (b, num_classes))
  return mask2former_loss(outputs, LabelMasks(labels, classes), classes,
                          _present(labels, num_classes), rng=rng, **options)


# --------------------------------------------------------------------------- panoptic targets


def panoptic_targets(labels: jax.Array, segment_classes: jax.Array, ignore_index: int
                     ) -> tuple[LabelMasks, jax.Array, jax.Array]:
  """Panoptic segments from a segment-index map (`segvit_jax.data.transforms.segment_map`):
  `labels` (B, H, W) int with segment m's pixels = m and `ignore_index` (or any id outside
  [0, M)) elsewhere, or (B, H, W, L) layers of such maps (segment m: the union of its pixels
  over the layers), `segment_classes` (B, M) int = segment m's class, -1 for padding.
  -> targets `LabelMasks` (mask m = `labels == m`), classes (B, M) int32 (padding -> 0),
  valid (B, M) bool = a class is given and the segment has a pixel (a segment the crop
  removed is no target, as in EoMT, which drops empty masks after augmenting)."""
  m = segment_classes.shape[1]
  labels = _labelled(labels, m, ignore_index)
  valid = (segment_classes >= 0) & _present(labels, m)
  index = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), segment_classes.shape)
  return (LabelMasks(labels, index), jnp.maximum(segment_classes, 0).astype(jnp.int32),
          valid)


def mask2former_panoptic_loss(outputs: Mapping[str, Any], labels: jax.Array, *,
                              segment_classes: jax.Array, num_classes: int,
                              ignore_index: int, rng: jax.Array,
                              num_queries: int | None = None, **options
                              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`mask2former_loss` on panoptic segments (`panoptic_targets`: thing instances and stuff
  regions alike, each its own target) given as a (B, H, W) segment-index map, or (B, H, W, L)
  layers of them for overlapping instances, and the segments' classes (B, M); the masks are
  sampled from the map, never built. `num_queries`,
  if given, must be the outputs' Q; `options`: those of `mask2former_loss`."""
  _check_outputs(outputs, num_classes, num_queries)
  targets, classes, valid = panoptic_targets(labels, segment_classes, ignore_index)
  return mask2former_loss(outputs, targets, classes, valid, rng=rng, **options)


# --------------------------------------------------------------------------- accumulation

# Gradient accumulation needs the loss's normalisation: the cross-entropy is a mean weighted
# by 1 (matched query) or `no_object_weight` over all queries of the batch; BCE and dice are
# divided by the batch's count of masks `mask_normalizer` names (at least 1): all of them or the
# matched ones. Each term -> (its normaliser in `mask2former_normalisers`, the floor the loss
# applies to it).
TERM_NORMALISERS = {"loss_ce": ("queries", 0.0), "loss_mask": ("masks", 1.0),
                    "loss_dice": ("masks", 1.0)}


def mask2former_normalisers(labels: jax.Array, num_classes: int, ignore_index: int,
                            options: Mapping[str, Any]) -> dict[str, jax.Array]:
  """The un-floored denominators of the `mask2former_semantic_loss` terms for `labels`
  (B, H, W) and the loss `options` (`num_queries` required, `no_object_weight`,
  `mask_normalizer`): the no-object-weighted query count (min(masks, Q) queries of an image
  are matched) and the number of masks, all or the matched ones (`MASK_NORMALIZERS`). Both add
  up over micro-batches, unlike the loss terms they divide."""
  masks = jnp.sum(_present(_labelled(labels, num_classes, ignore_index), num_classes), axis=1)
  return _normalisers(masks, options)


def mask2former_panoptic_normalisers(labels: jax.Array, num_classes: int, ignore_index: int,
                                     options: Mapping[str, Any], *, segment_classes: jax.Array
                                     ) -> dict[str, jax.Array]:
  """`mask2former_normalisers` of `mask2former_panoptic_loss`: the masks are the valid
  segments (`panoptic_targets`) of the (B, H, W) segment-index map `labels` and its
  `segment_classes` (B, M)."""
  del num_classes  # the segments, not the classes, are the targets
  _, _, valid = panoptic_targets(labels, segment_classes, ignore_index)
  return _normalisers(jnp.sum(valid, axis=1), options)


def _normalisers(masks: jax.Array, options: Mapping[str, Any]) -> dict[str, jax.Array]:
  """From the (B,) target counts: the no-object-weighted query count and the mask count
  (`mask_count`'s, summed over images: an image with more targets than queries has Q
  matched)."""
  if options.get("num_queries") is None:
    raise ValueError("the mask2former loss needs config.loss.num_queries (the model's query "
                     "count) to weight micro-batches for gradient accumulation")
  q = int(options["num_queries"])
  no_object_weight = options["no_object_weight"]
  matched = jnp.minimum(masks, q).astype(jnp.float32)
  queries = jnp.sum(matched + (q - matched) * no_object_weight)
  counted = {"valid_targets": masks, "matched_targets": matched}[
      check_mask_normalizer(options["mask_normalizer"])]
  return {"queries": queries, "masks": jnp.sum(counted).astype(jnp.float32)}
