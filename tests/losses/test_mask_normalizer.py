"""What the Mask2Former loss divides BCE and dice by (`config.loss.mask_normalizer`): every
valid target ("valid_targets", transformers' Mask2FormerLoss) or the matched ones
("matched_targets", the EoMT release's MaskClassificationLoss). A hand-made case with more
targets than queries where the two differ, the "matched_targets" terms against a torch
transcription of the release's normalisation (one process and two), the accumulation
normalisers, the config plumbing and every EoMT config's choice."""

import glob
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from segvit_jax.config_utils import load_config
from segvit_jax.losses import LOSSES, get_loss
from segvit_jax.losses import mask_classification as mc

# The Mask2Former loss options of the EoMT configs (config.loss) besides the point count and
# the normaliser.
M2F = dict(oversample_ratio=3.0, importance_ratio=0.75, no_object_weight=0.1, class_weight=2.0,
           mask_weight=5.0, dice_weight=5.0)
CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")


# ------------------------------------------------------------------------------ hand-made case


def _planted_case():
  """B = 2 images, Q = 3 queries, M = 5 target slots. Image 0 has 5 valid targets (classes
  0..4), image 1 has 2 (classes 0, 1) and 3 padding slots. Query j is sure of class j (logit
  10, the others 0), except query 2 of image 1, sure of no-object (class 5). Every mask logit
  is 0 and every target mask is empty, so the mask costs tie and the class cost alone picks
  the matching: query j <-> target j; targets 3 and 4 of image 0 stay unmatched. Valid: 7,
  matched: 5."""
  b, q, k, m, size = 2, 3, 5, 5, 8
  class_logits = np.zeros((b, q, k + 1), np.float32)
  for j in range(q):
    class_logits[:, j, j] = 10.0
  class_logits[1, 2] = 0.0
  class_logits[1, 2, k] = 10.0
  outputs = {"class_logits": jnp.asarray(class_logits),
             "mask_logits": jnp.zeros((b, q, size, size), jnp.float32)}
  outputs["aux_outputs"] = [dict(outputs)]
  target_masks = jnp.zeros((b, m, 2 * size, 2 * size), jnp.float32)
  target_classes = jnp.asarray([[0, 1, 2, 3, 4], [0, 1, 0, 0, 0]])
  target_valid = jnp.asarray([[True] * 5, [True, True, False, False, False]])
  return outputs, target_masks, target_classes, target_valid, class_logits


def _hand_terms(class_logits, num_points, num_masks):
  """The weighted terms of the planted case by hand. Every matched pair: logits 0 at every
  point (zero padding keeps them 0), targets 0, so BCE = log 2 and dice = 1 - 1 / (P/2 + 1)
  with the +1 smoothing; 5 pairs. Cross-entropy: a matched query or image 1's query 2 puts
  e^10 on its class and 1 on the 5 others: -log(e^10 / (e^10 + 5)), weight 1 (matched) or 0.1
  (query 2 of image 1, no-object); no query is wrong."""
  nll = math.log1p(5 * math.exp(-10.0))
  weights = [1.0] * 5 + [0.1]
  loss_ce = sum(w * nll for w in weights) / sum(weights)
  assert np.allclose(class_logits.max(-1), 10.0)
  bce = 5 * math.log(2.0)
  dice = 5 * (1 - 1 / (num_points / 2 + 1))
  return {"loss_ce": 2.0 * loss_ce, "loss_mask": 5.0 * bce / num_masks,
          "loss_dice": 5.0 * dice / num_masks}


def test_normalisers_differ_with_more_targets_than_queries():
  outputs, target_masks, target_classes, target_valid, class_logits = _planted_case()
  num_points = 8
  got = {}
  for normalizer in ("valid_targets", "matched_targets"):
    _, got[normalizer] = jax.jit(lambda o, n=normalizer: mc.mask2former_loss(
        o, target_masks, target_classes, target_valid, rng=jax.random.key(0),
        num_points=num_points, mask_normalizer=n, **M2F))(outputs)
  for normalizer, count in (("valid_targets", 7), ("matched_targets", 5)):
    want = _hand_terms(class_logits, num_points, count)
    for suffix in ("", "_0"):  # the final output and the auxiliary one, each its own matching
      for name, value in want.items():
        assert abs(float(got[normalizer][name + suffix]) - value) < 1e-6, (normalizer, name)
  # The numbers: log 2 = 0.693147, dice of a pair 0.8 at 8 points.
  assert abs(float(got["matched_targets"]["loss_mask"]) - 5 * math.log(2)) < 1e-6  # 3.465736
  assert abs(float(got["valid_targets"]["loss_mask"]) - 25 / 7 * math.log(2)) < 1e-6  # 2.475526
  assert abs(float(got["matched_targets"]["loss_dice"]) - 4.0) < 1e-6
  assert abs(float(got["valid_targets"]["loss_dice"]) - 20 / 7) < 1e-6  # 2.857143
  assert float(got["matched_targets"]["loss_ce"]) == float(got["valid_targets"]["loss_ce"])


def test_mask_count_on_a_hand_made_matching():
  query_for_target = jnp.asarray([[2, 0, -1, 1, -1], [1, -1, -1, -1, -1]])  # Q = 3
  valid = jnp.asarray([[True] * 5, [True, False, False, False, False]])
  assert float(mc.mask_count(query_for_target, valid, "valid_targets")) == 6.0
  assert float(mc.mask_count(query_for_target, valid, "matched_targets")) == 4.0
  nothing = jnp.full((2, 5), -1)
  assert float(mc.mask_count(nothing, jnp.zeros((2, 5), bool), "matched_targets")) == 1.0
  with pytest.raises(ValueError, match=r"config.loss.mask_normalizer='matched': expected one "
                                       r"of 'valid_targets' .*'matched_targets'"):
    mc.mask_count(query_for_target, valid, "matched")


# ------------------------------------------------------------------------------ the release


def _torch_point_sample(x, coords):
  """detectron2's point_sample: (N, C, H, W), (N, P, 2) in [0, 1] -> (N, C, P)."""
  return F.grid_sample(x, 2.0 * coords.unsqueeze(2) - 1.0, align_corners=False)[..., 0]


def _release_process_terms(class_logits, mask_logits, target_masks, target_classes, indices,
                           coords):
  """One process of the EoMT release's criterion, written from its reading: the
  cross-entropy of transformers' `loss_labels` (a weighted mean over the process's queries),
  and `loss_masks` called with a normaliser of 1 (BCE mean over points, summed over pairs;
  dice summed over pairs). Returns (ce, bce sum, dice sum, matched pairs); `indices` per image:
  (query indices, target indices), as the matcher gives."""
  b, q, k1 = class_logits.shape
  target_full = torch.full((b, q), k1 - 1, dtype=torch.long)
  src, tgt, pts = [], [], []
  for i, (queries, targets) in enumerate(indices):
    for qq, t in zip(queries, targets):
      target_full[i, qq] = int(target_classes[i][t])
      src.append(mask_logits[i, qq])
      tgt.append(target_masks[i][t])
      pts.append(coords[i][t])
  empty_weight = torch.ones(k1, dtype=torch.float64)
  empty_weight[-1] = 0.1
  ce = F.cross_entropy(class_logits.transpose(1, 2), target_full, empty_weight)
  point_logits = _torch_point_sample(torch.stack(src)[:, None], torch.stack(pts))[:, 0]
  point_labels = _torch_point_sample(torch.stack(tgt)[:, None], torch.stack(pts))[:, 0]
  bce = F.binary_cross_entropy_with_logits(point_logits, point_labels, reduction="none")
  s = point_logits.sigmoid()
  dice = 1 - (2 * (s * point_labels).sum(-1) + 1) / (s.sum(-1) + point_labels.sum(-1) + 1)
  return ce, bce.mean(1).sum(), dice.sum(), sum(len(t) for _, t in indices)


def _release_terms(processes):
  """The release over data-parallel processes, each a tuple of `_release_process_terms`
  arguments: the matched-pair count summed over processes (`all_reduce`), divided by the
  world size, clamped to >= 1, divides each process's BCE and dice; DDP averages the
  processes' gradients, so the loss that trains is the mean of the processes' losses."""
  each = [_release_process_terms(*p) for p in processes]
  world = len(each)
  num_masks = max(sum(n for *_, n in each) / world, 1.0)
  mean = lambda xs: sum(xs) / world  # noqa: E731
  return {"loss_ce": 2.0 * mean([e[0] for e in each]),
          "loss_mask": 5.0 * mean([e[1] / num_masks for e in each]),
          "loss_dice": 5.0 * mean([e[2] / num_masks for e in each])}


def _random_case(seed=11):
  """B = 4 images, Q = 4 queries, M = 7 target slots with 7, 2, 5 and 4 valid targets (two
  images with more targets than queries); a scipy matching of random costs (the matcher's
  output form); random logits, masks and per-target points."""
  rng = np.random.default_rng(seed)
  b, q, k, m, h, w, hh, ww, p = 4, 4, 5, 7, 6, 8, 12, 16, 30
  counts = [7, 2, 5, 4]
  class_logits = rng.normal(size=(b, q, k + 1)).astype(np.float32)
  mask_logits = (3 * rng.normal(size=(b, q, h, w))).astype(np.float32)
  target_masks = (rng.random((b, m, hh, ww)) < 0.4).astype(np.float32)
  target_classes = rng.integers(0, k, (b, m))
  valid = np.arange(m)[None, :] < np.asarray(counts)[:, None]
  coords = rng.random((b, m, p, 2)).astype(np.float32)
  indices, query_for_target = [], np.full((b, m), -1)
  for i, n in enumerate(counts):
    queries, targets = linear_sum_assignment(rng.random((q, n)))
    indices.append((queries, targets))
    query_for_target[i, targets] = queries
  return (class_logits, mask_logits, target_masks, target_classes, valid, query_for_target,
          coords, indices)


def test_matched_targets_equals_the_release_normalisation():
  (class_logits, mask_logits, target_masks, target_classes, valid, query_for_target, coords,
   indices) = _random_case()
  assert int(np.sum(query_for_target >= 0)) == 4 + 2 + 4 + 4 < int(valid.sum())  # 14 < 18

  def ours(cl, ml, rows):
    match = jnp.asarray(query_for_target[rows])
    terms = mc.losses_for_assignment(
        {"class_logits": cl[rows], "mask_logits": ml[rows]}, jnp.asarray(target_masks[rows]),
        jnp.asarray(target_classes[rows]), match,
        mc.mask_count(match, jnp.asarray(valid[rows]), "matched_targets"),
        point_coords=jnp.asarray(coords[rows]), num_points=coords.shape[2], **M2F)
    return sum(terms.values()), terms

  rows = np.arange(4)
  (_, terms), grads = jax.jit(jax.value_and_grad(
      lambda cl, ml: ours(cl, ml, rows), argnums=(0, 1), has_aux=True))(
          jnp.asarray(class_logits), jnp.asarray(mask_logits))

  cl = torch.from_numpy(class_logits).double().requires_grad_()
  ml = torch.from_numpy(mask_logits).double().requires_grad_()
  tm, tc = torch.from_numpy(target_masks).double(), torch.from_numpy(coords).double()
  one = _release_terms([(cl, ml, tm, target_classes, indices, tc)])
  sum(one.values()).backward()
  for name, value in one.items():  # measured: max abs difference 4.4e-7 (loss_mask)
    assert abs(float(terms[name]) - value.item()) < 1e-5, (name, float(terms[name]), value)
  # gradients: measured max abs difference 1.1e-8
  np.testing.assert_allclose(np.asarray(grads[0]), cl.grad.numpy(), rtol=0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(grads[1]), ml.grad.numpy(), rtol=0, atol=1e-5)

  # Two processes of two images each: the averaged count (14 / 2 = 7 pairs a process) over
  # the global batch is our global count (14), so the mask terms agree. (The cross-entropy,
  # a weighted mean per process, averaged, differs from our weighted mean over the global
  # batch unless the processes' weight sums are equal: 4.3614 against 4.2723 here; not
  # compared.)
  halves = [np.array([0, 1]), np.array([2, 3])]
  two = _release_terms([(cl[r], ml[r], tm[r], target_classes[r], [indices[i] for i in r],
                         tc[r]) for r in halves])
  for name in ("loss_mask", "loss_dice"):
    assert abs(float(terms[name]) - two[name].item()) < 1e-5, name
  # "valid_targets" divides the same sums by the 18 valid targets instead.
  valid_terms = mc.losses_for_assignment(
      {"class_logits": jnp.asarray(class_logits), "mask_logits": jnp.asarray(mask_logits)},
      jnp.asarray(target_masks), jnp.asarray(target_classes), jnp.asarray(query_for_target),
      mc.mask_count(jnp.asarray(query_for_target), jnp.asarray(valid), "valid_targets"),
      point_coords=jnp.asarray(coords), num_points=coords.shape[2], **M2F)
  for name in ("loss_mask", "loss_dice"):
    assert abs(float(valid_terms[name]) * 18 - float(terms[name]) * 14) < 1e-4, name


# ------------------------------------------------------------------------------ accumulation


def test_matched_normalisers_weight_micro_batches_exactly():
  """With more classes present than queries, "masks" counts min(present, Q) per image, and
  each micro-batch's terms times its share sum to the whole-batch terms."""
  rng = np.random.default_rng(12)
  b, q, k, size, p = 4, 3, 6, 12, 20
  labels = rng.integers(0, k, (b, size, size))
  labels[0] = 255  # no masks
  labels[1][labels[1] >= 2] = 0  # 2 classes present, fewer than Q
  labels = jnp.asarray(labels)
  present = np.array([[(np.asarray(labels[i]) == c).any() for c in range(k)] for i in range(b)])
  np.testing.assert_array_equal(present.sum(1), [0, 2, 6, 6])
  options = {"num_queries": q, "no_object_weight": 0.1}
  counts = {n: mc.mask2former_normalisers(labels, k, 255, dict(options, mask_normalizer=n))
            for n in ("valid_targets", "matched_targets")}
  assert float(counts["valid_targets"]["masks"]) == 14.0
  assert float(counts["matched_targets"]["masks"]) == 0 + 2 + 3 + 3
  assert float(counts["matched_targets"]["queries"]) == pytest.approx(8 + 0.1 * 4)
  with pytest.raises(ValueError, match="config.loss.mask_normalizer='all'"):
    mc.mask2former_normalisers(labels, k, 255, dict(options, mask_normalizer="all"))

  outputs = {"class_logits": jnp.asarray(rng.normal(size=(b, q, k + 1)), jnp.float32),
             "mask_logits": jnp.asarray(rng.normal(size=(b, q, 6, 6)), jnp.float32)}
  masks, classes, valid = mc.semantic_targets(labels, k, 255)
  query_for_target = np.full((b, k), -1)
  for i in range(b):
    targets = np.flatnonzero(present[i])
    rows, cols = linear_sum_assignment(rng.random((q, len(targets))))
    query_for_target[i, targets[cols]] = rows
  query_for_target = jnp.asarray(query_for_target)
  coords = jnp.asarray(rng.random((b, k, p, 2)), jnp.float32)

  def terms(rows):
    sel = lambda x: x[rows]  # noqa: E731
    n = mc.mask_count(query_for_target[rows], valid[rows], "matched_targets")
    return mc.losses_for_assignment(jax.tree.map(sel, outputs), masks[rows], classes[rows],
                                    query_for_target[rows], n, point_coords=coords[rows],
                                    num_points=p, **M2F)

  whole = terms(np.arange(b))
  total = counts["matched_targets"]
  accumulated = {name: 0.0 for name in whole}
  for rows in (np.array([0, 2]), np.array([1, 3])):
    share = mc.mask2former_normalisers(labels[rows], k, 255,
                                       dict(options, mask_normalizer="matched_targets"))
    for name, value in terms(rows).items():
      key, floor = mc.TERM_NORMALISERS[name]
      accumulated[name] += value * jnp.maximum(share[key], floor) / jnp.maximum(total[key],
                                                                                floor)
  for name in whole:
    assert abs(float(accumulated[name]) - float(whole[name])) < 1e-5, name


# ------------------------------------------------------------------------------ configs


def _eomt_configs():
  return sorted(os.path.basename(f)[:-3] for f in glob.glob(os.path.join(CONFIGS, "eomt_*.py")))


def test_every_eomt_config_divides_by_the_matched_targets():
  names = _eomt_configs()
  assert len(names) == 22, names  # 15 on DINOv2, 7 on DINOv3
  for name in names:
    for arg in ("", ":smoke"):
      c = load_config(f"configs/{name}.py{arg}")
      assert c.loss.mask_normalizer == "matched_targets", (name, arg)
      loss, options = get_loss(c.loss)
      assert loss.shared_options == ("mask_normalizer",)
      assert options["mask_normalizer"] == "matched_targets"
  # The skeleton's (and so an ATM config's) value is transformers'; the ATM loss drops it.
  seg = load_config("configs/segvit_vit_b16_ade20k.py")
  assert seg.loss.mask_normalizer == "valid_targets"
  loss, options = get_loss(seg.loss)
  assert loss is LOSSES["atm"] and "mask_normalizer" not in options


def test_a_mask_classification_loss_section_must_state_the_normaliser():
  section = dict(name="mask2former", num_queries=8, num_points=16, **M2F)
  with pytest.raises(ValueError, match="config.loss has no 'mask_normalizer', which loss "
                                       "'mask2former' needs"):
    get_loss(section)
  loss, options = get_loss(dict(section, mask_normalizer="matched_targets"))
  assert loss is LOSSES["mask2former"] and options["mask_normalizer"] == "matched_targets"
