"""Mask2Former's set loss against torch formulas written here from the reference
(detectron2 `point_sample`, Mask2Former `HungarianMatcher` and `SetCriterion`): point
sampling equals `grid_sample(align_corners=False)`, the matching cost and the losses on a
fixed matching and fixed points (values and gradients) equal torch's, importance sampling
keeps the most uncertain candidates, semantic targets on a hand-made label map, the matching
recovers a planted assignment, the accumulation normalisers, and the whole loss under
`jit` and `grad`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segvit_jax.losses import mask_classification as mc

# The Mask2Former loss options of the EoMT configs (config.loss) besides the point count.
M2F = dict(oversample_ratio=3.0, importance_ratio=0.75, no_object_weight=0.1, class_weight=2.0,
           mask_weight=5.0, dice_weight=5.0)


def _torch_point_sample(x, coords):
  """detectron2's point_sample: (N, C, H, W), (N, P, 2) in [0, 1] -> (N, C, P)."""
  return F.grid_sample(x, 2.0 * coords.unsqueeze(2) - 1.0, align_corners=False)[..., 0]


def test_point_sample_equals_grid_sample():
  rng = np.random.default_rng(0)
  masks = rng.normal(size=(2, 3, 7, 10)).astype(np.float32)
  coords = rng.random((2, 50, 2)).astype(np.float32)
  coords[:, :6] = [[0, 0], [1, 1], [0, 1], [1, 0], [0.5, 0], [0.01, 0.99]]  # border taps
  got = np.asarray(mc.point_sample(jnp.asarray(masks), jnp.asarray(coords)))
  expected = _torch_point_sample(torch.from_numpy(masks).double(),
                                 torch.from_numpy(coords).double()).numpy()
  np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)


def test_label_masks_sample_like_dense_masks():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 4, (2, 9, 13))
  labels[:, :2] = 255
  masks, classes, _ = mc.semantic_targets(jnp.asarray(labels), 4, 255)
  coords = jnp.asarray(rng.random((2, 3, 40, 2)), jnp.float32)
  index = jnp.asarray([[3, 0, 1], [2, 2, 0]])
  dense = mc.sample_targets(masks, index, coords)
  by_label = mc.sample_targets(mc.LabelMasks(jnp.where(jnp.asarray(labels) < 4, labels, -1),
                                             classes), index, coords)
  np.testing.assert_allclose(np.asarray(by_label), np.asarray(dense), rtol=0, atol=1e-6)


def test_semantic_targets_on_a_hand_made_label_map():
  labels = np.array([[[0, 0, 2, 255],
                      [0, 7, 2, 2]],
                     [[255, 255, 255, 255],
                      [255, 255, 255, 3]]])
  masks, classes, valid = map(np.asarray, mc.semantic_targets(jnp.asarray(labels), 4, 255))
  assert masks.shape == (2, 4, 2, 4) and masks.dtype == np.float32
  np.testing.assert_array_equal(classes, [[0, 1, 2, 3], [0, 1, 2, 3]])
  np.testing.assert_array_equal(valid, [[True, False, True, False],
                                        [False, False, False, True]])
  np.testing.assert_array_equal(masks[0, 0], [[1, 1, 0, 0], [1, 0, 0, 0]])
  np.testing.assert_array_equal(masks[0, 2], [[0, 0, 1, 0], [0, 0, 1, 1]])
  assert masks[0, 1].sum() == 0 and masks[0, 3].sum() == 0  # 7 is out of range: no mask
  np.testing.assert_array_equal(masks[1, 3], [[0, 0, 0, 0], [0, 0, 0, 1]])
  assert masks[1, :3].sum() == 0  # ignore pixels are in no mask
  # ignore_index inside [0, K) (reduce_zero_label-style data) is in no mask either
  _, _, valid = mc.semantic_targets(jnp.asarray(labels), 4, ignore_index=0)
  np.testing.assert_array_equal(np.asarray(valid)[0], [False, False, True, False])


def test_matching_cost_equals_the_reference():
  rng = np.random.default_rng(2)
  b, q, k, m, p = 2, 6, 5, 4, 30
  class_logits = rng.normal(size=(b, q, k + 1)).astype(np.float32)
  point_logits = (3 * rng.normal(size=(b, q, p))).astype(np.float32)
  target_points = rng.random((b, m, p)).astype(np.float32)
  target_points[:, :, :10] = rng.random((b, m, 10)) < 0.5
  target_classes = rng.integers(0, k, (b, m))
  got = np.asarray(mc.matching_cost(jnp.asarray(class_logits), jnp.asarray(point_logits),
                                    jnp.asarray(target_classes), jnp.asarray(target_points),
                                    class_weight=2.0, mask_weight=5.0, dice_weight=5.0))
  for i in range(b):  # HungarianMatcher.memory_efficient_forward, one image
    prob = torch.from_numpy(class_logits[i]).double().softmax(-1)
    cost_class = -prob[:, torch.from_numpy(target_classes[i])]
    x = torch.from_numpy(point_logits[i]).double()
    t = torch.from_numpy(target_points[i]).double()
    pos = F.binary_cross_entropy_with_logits(x, torch.ones_like(x), reduction="none")
    neg = F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none")
    cost_mask = (torch.einsum("nc,mc->nm", pos, t)
                 + torch.einsum("nc,mc->nm", neg, 1 - t)) / p
    s = x.sigmoid()
    cost_dice = 1 - (2 * torch.einsum("nc,mc->nm", s, t) + 1) / (
        s.sum(-1)[:, None] + t.sum(-1)[None, :] + 1)
    expected = 5.0 * cost_mask + 2.0 * cost_class + 5.0 * cost_dice
    np.testing.assert_allclose(got[i], expected.numpy(), rtol=0, atol=1e-5)


def _fixed_case(seed=3):
  rng = np.random.default_rng(seed)
  b, q, k, m, h, w, hh, ww, p = 2, 6, 5, 4, 8, 10, 16, 20, 25
  class_logits = rng.normal(size=(b, q, k + 1)).astype(np.float32)
  mask_logits = (3 * rng.normal(size=(b, q, h, w))).astype(np.float32)
  target_masks = (rng.random((b, m, hh, ww)) < 0.4).astype(np.float32)
  target_classes = rng.integers(0, k, (b, m))
  query_for_target = np.array([[4, -1, 0, 2], [1, 5, -1, -1]])  # -1: padding
  coords = rng.random((b, m, p, 2)).astype(np.float32)
  return class_logits, mask_logits, target_masks, target_classes, query_for_target, coords


def _reference_losses(class_logits, mask_logits, target_masks, target_classes,
                      query_for_target, coords):
  """Mask2Former's SetCriterion (loss_labels, loss_masks) with the given matching and
  points, in float64: torch tensors in, dict of weighted terms out."""
  b, q, k1 = class_logits.shape
  idx = [(i, qq, t) for i in range(b) for t, qq in enumerate(query_for_target[i]) if qq >= 0]
  num_masks = max(len(idx), 1)
  target_full = torch.full((b, q), k1 - 1, dtype=torch.long)
  for i, qq, t in idx:
    target_full[i, qq] = int(target_classes[i, t])
  empty_weight = torch.ones(k1, dtype=torch.float64)
  empty_weight[-1] = 0.1
  loss_ce = F.cross_entropy(class_logits.transpose(1, 2), target_full, empty_weight)
  src = torch.stack([mask_logits[i, qq] for i, qq, _ in idx])[:, None]
  tgt = torch.stack([target_masks[i, t] for i, _, t in idx])[:, None]
  pts = torch.stack([coords[i, t] for i, _, t in idx])
  point_logits = _torch_point_sample(src, pts)[:, 0]
  point_labels = _torch_point_sample(tgt, pts)[:, 0]
  bce = F.binary_cross_entropy_with_logits(point_logits, point_labels, reduction="none")
  loss_mask = bce.mean(1).sum() / num_masks
  s = point_logits.sigmoid()
  dice = 1 - (2 * (s * point_labels).sum(-1) + 1) / (s.sum(-1) + point_labels.sum(-1) + 1)
  loss_dice = dice.sum() / num_masks
  return {"loss_ce": 2.0 * loss_ce, "loss_mask": 5.0 * loss_mask, "loss_dice": 5.0 * loss_dice}


def test_losses_for_a_fixed_matching_and_points_equal_the_reference():
  case = _fixed_case()
  class_logits, mask_logits, target_masks, target_classes, query_for_target, coords = case
  num_masks = float(np.sum(query_for_target >= 0))

  def total(cl, ml):
    terms = mc.losses_for_assignment(
        {"class_logits": cl, "mask_logits": ml}, jnp.asarray(target_masks),
        jnp.asarray(target_classes), jnp.asarray(query_for_target), num_masks,
        point_coords=jnp.asarray(coords), num_points=coords.shape[2], **M2F)
    return sum(terms.values()), terms

  (loss, terms), grads = jax.jit(jax.value_and_grad(total, argnums=(0, 1), has_aux=True))(
      jnp.asarray(class_logits), jnp.asarray(mask_logits))

  cl = torch.from_numpy(class_logits).double().requires_grad_()
  ml = torch.from_numpy(mask_logits).double().requires_grad_()
  expected = _reference_losses(cl, ml, torch.from_numpy(target_masks).double(),
                               target_classes, query_for_target,
                               torch.from_numpy(coords).double())
  sum(expected.values()).backward()
  for name, value in expected.items():
    assert abs(float(terms[name]) - value.item()) < 2e-6, (name, float(terms[name]), value)
  np.testing.assert_allclose(np.asarray(grads[0]), cl.grad.numpy(), rtol=0, atol=2e-7)
  np.testing.assert_allclose(np.asarray(grads[1]), ml.grad.numpy(), rtol=0, atol=2e-7)


def test_uncertain_points_are_the_most_uncertain_candidates():
  rng = np.random.default_rng(4)
  logits = jnp.asarray(rng.normal(size=(2, 3, 12, 9)) * 4, jnp.float32)
  channels = jnp.asarray([[0, 1, 2], [2, 2, 1]])
  seen = []

  def at_points(coords):
    seen.append(coords)
    return mc.sample_channels(logits, channels, coords)

  points = np.asarray(mc.uncertain_point_coords(jax.random.key(0), at_points, (2, 3), 40,
                                                oversample_ratio=3.0, importance_ratio=0.75))
  assert points.shape == (2, 3, 40, 2) and points.min() >= 0 and points.max() < 1
  candidates = np.asarray(seen[0])
  assert candidates.shape == (2, 3, 120, 2)
  uncertainty = -np.abs(np.asarray(mc.sample_channels(logits, channels, seen[0])))
  for i in range(2):
    for s in range(3):
      top = np.argsort(-uncertainty[i, s])[:30]  # int(0.75 * 40) most uncertain
      expected = {tuple(c) for c in candidates[i, s, top]}
      assert {tuple(c) for c in points[i, s, :30]} == expected
      # the last 10 are fresh uniform points, not candidates
      assert not {tuple(c) for c in points[i, s, 30:]} & {tuple(c) for c in candidates[i, s]}


def test_matching_recovers_a_planted_assignment():
  """Query perm[m] predicts target m (class and mask) confidently, the other queries predict
  no-object: the matching finds perm, and so does the loss's own matching (its cross-entropy
  is near 0 only then: a wrong pair gives a target class to a query sure of another)."""
  rng = np.random.default_rng(5)
  b, q, k, m, size = 2, 8, 5, 5, 16
  target_masks = (rng.random((b, m, size, size)) < 0.5).astype(np.float32)
  target_classes = rng.integers(0, k, (b, m))
  valid = np.array([[True] * 5, [True, False, True, True, False]])
  perm = np.stack([rng.permutation(q)[:m] for _ in range(b)])
  class_logits = np.zeros((b, q, k + 1), np.float32)
  class_logits[..., k] = 10.0
  mask_logits = np.full((b, q, size, size), -10.0, np.float32)
  for i in range(b):
    for t in range(m):
      if valid[i, t]:
        class_logits[i, perm[i, t]] = 0
        class_logits[i, perm[i, t], target_classes[i, t]] = 10.0
        mask_logits[i, perm[i, t]] = 20 * (2 * target_masks[i, t] - 1)
  outputs = {"class_logits": jnp.asarray(class_logits), "mask_logits": jnp.asarray(mask_logits)}
  cost = mc.output_matching_cost(outputs, jnp.asarray(target_masks),
                                 jnp.asarray(target_classes), jax.random.key(1), 500,
                                 2.0, 5.0, 5.0)
  query_for_target = np.asarray(mc.hungarian_match(cost, jnp.asarray(valid)))
  np.testing.assert_array_equal(query_for_target, np.where(valid, perm, -1))
  _, terms = jax.jit(lambda o: mc.mask2former_loss(
      o, jnp.asarray(target_masks), jnp.asarray(target_classes), jnp.asarray(valid),
      rng=jax.random.key(2), num_points=500, mask_normalizer="valid_targets", **M2F))(outputs)
  assert float(terms["loss_ce"]) < 1e-3


def _semantic_case(seed=6):
  rng = np.random.default_rng(seed)
  b, q, k, h, w, size = 2, 8, 5, 8, 8, 32

  def out(r):
    return {"class_logits": jnp.asarray(r.normal(size=(b, q, k + 1)), jnp.float32),
            "mask_logits": jnp.asarray(3 * r.normal(size=(b, q, h, w)), jnp.float32)}

  outputs = out(rng)
  outputs["aux_outputs"] = [out(rng), out(rng)]
  labels = rng.integers(0, k, (b, size, size))
  labels[:, :6] = 255
  labels[1][labels[1] == 3] = 1
  return outputs, jnp.asarray(labels), k


def test_semantic_loss_is_finite_and_differentiable_under_jit():
  outputs, labels, k = _semantic_case()

  def loss_fn(o):
    return mc.mask2former_semantic_loss(o, labels, num_classes=k, ignore_index=255,
                                        rng=jax.random.key(0), num_points=300, num_queries=8,
                                        mask_normalizer="valid_targets", **M2F)

  (loss, terms), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(outputs)
  assert set(terms) == {f"{n}{s}" for n in ("loss_ce", "loss_mask", "loss_dice")
                        for s in ("", "_0", "_1")}
  assert np.isfinite(float(loss)) and abs(float(loss) - sum(map(float, terms.values()))) < 1e-4
  for g in jax.tree.leaves(grads):
    assert np.all(np.isfinite(np.asarray(g))) and float(jnp.abs(g).sum()) > 0
  # The label map's masks sampled from the labels == the dense one-hot masks.
  masks, classes, valid = mc.semantic_targets(labels, k, 255)
  dense, dense_terms = mc.mask2former_loss(outputs, masks, classes, valid,
                                           rng=jax.random.key(0), num_points=300,
                                           mask_normalizer="valid_targets", **M2F)
  assert abs(float(dense) - float(loss)) < 1e-5
  with pytest.raises(ValueError, match="num_queries=9, the model gives 8 queries"):
    mc.mask2former_semantic_loss(outputs, labels, num_classes=k, ignore_index=255,
                                 rng=jax.random.key(0), num_queries=9, num_points=300, **M2F)
  with pytest.raises(ValueError, match="expected num_classes \\+ 1 = 7"):
    mc.mask2former_semantic_loss(outputs, labels, num_classes=6, ignore_index=255,
                                 rng=jax.random.key(0), num_points=300, **M2F)


def test_normalisers_weight_micro_batches_exactly():
  """Each term times its micro-batch's share of the batch normaliser sums to the
  whole-batch term (fixed matching and points, so the terms are deterministic)."""
  rng = np.random.default_rng(7)
  b, q, k, size, p = 4, 6, 5, 12, 20
  labels = rng.integers(0, k, (b, size, size))
  labels[0] = 255  # an image with no masks
  labels[1][labels[1] >= 2] = 0
  labels = jnp.asarray(labels)
  options = {"num_queries": q, "no_object_weight": 0.1, "mask_normalizer": "valid_targets"}
  counts = mc.mask2former_normalisers(labels, k, 255, options)
  present = np.array([[(np.asarray(labels[i]) == c).any() for c in range(k)] for i in range(b)])
  assert float(counts["masks"]) == present.sum()
  assert abs(float(counts["queries"]) - (present.sum() + 0.1 * (b * q - present.sum()))) < 1e-5
  with pytest.raises(ValueError, match="num_queries"):
    mc.mask2former_normalisers(labels, k, 255, {})

  outputs = {"class_logits": jnp.asarray(rng.normal(size=(b, q, k + 1)), jnp.float32),
             "mask_logits": jnp.asarray(rng.normal(size=(b, q, 6, 6)), jnp.float32)}
  masks, classes, valid = mc.semantic_targets(labels, k, 255)
  query_for_target = jnp.where(valid, jnp.asarray([rng.permutation(q)[:k] for _ in range(b)]),
                               -1)
  coords = jnp.asarray(rng.random((b, k, p, 2)), jnp.float32)

  def terms(rows):
    sel = lambda x: x[rows]  # noqa: E731
    n = jnp.maximum(jnp.sum(valid[rows]), 1.0)
    return mc.losses_for_assignment(jax.tree.map(sel, outputs), masks[rows], classes[rows],
                                    query_for_target[rows], n, point_coords=coords[rows],
                                    num_points=p, **M2F)

  whole = terms(np.arange(b))
  accumulated = {name: 0.0 for name in whole}
  for rows in (np.array([0, 2]), np.array([1, 3])):
    part = terms(rows)
    share = mc.mask2former_normalisers(labels[rows], k, 255, options)
    for name, value in part.items():
      key, floor = mc.TERM_NORMALISERS[name]
      accumulated[name] += value * jnp.maximum(share[key], floor) / jnp.maximum(counts[key],
                                                                                floor)
  for name in whole:
    assert abs(float(accumulated[name]) - float(whole[name])) < 1e-5, name
