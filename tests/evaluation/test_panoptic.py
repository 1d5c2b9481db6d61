"""Panoptic and instance evaluation (EoMT App. A.3, "Image processing."; Mask2Former Sec. 4.1,
"Post-processing.").

References:
- PQ: a hand computation on a 4 x 6 image (void, crowd, a false positive, a miss);
  torchmetrics' `PanopticQuality` on random segment maps (it agrees with COCO's panopticapi
  when no prediction is void: it also takes predicted-void pixels out of the union and drops
  misses that are mostly predicted void, which panopticapi does not); a port of panopticapi's
  `pq_compute_single_core` (np.unique over gt * 2^24 + pred, dicts) on random maps with crowd.
- Post-processing: constructed logits with known segments (thresholds, no-object, stuff merged,
  things apart, the overlap filter at exactly 0.8); EoMT's `to_per_pixel_preds_panoptic` and
  instance `eval_step` re-written in torch, on random logits.
- AP: pycocotools on cases whose COCO AP is known by hand (perfect: 100; a miss: 51/101 of the
  101 recall points; a false positive ranked first halves the precision; crowd ignored).
- Geometry: long_side sizes, black padding, `masks_at_size` against torch's two bilinear
  interpolations.
- eval.py on a fabricated COCO panoptic copy (3 non-square images) and a tiny random EoMT
  bundle. A random model predicts nothing at the 0.8 thresholds (its masks are noise), so the
  CLI runs lower `overlap_threshold`, and the left half of every ground-truth image is the
  model's own prediction (the right half the fabricated truth; one thing there is crowd): its
  PQ / SQ / RQ, per-class counts and AP equal the references composed in-process (the
  predictor's logits, the torch post-processing, the panopticapi port, COCOeval built here);
  2 processes give the numbers of 1.

Measured on a 2-core CPU: 24 s for the file with a cold compilation cache, 16 s warm (the 3
eval.py processes and predict.py run in parallel with nothing else; they overlap).
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import demo
from segvit_jax import bundle as bundle_lib
from segvit_jax.data import coco_panoptic, pipeline
from segvit_jax.data import transforms as T
from segvit_jax.evaluation import inference, metrics, panoptic
from segvit_jax.evaluation import pq as pm
from segvit_jax.models import build_model

from tests import fabricate
from tests.support import ROOT, device_env, free_port

torch = pytest.importorskip("torch")
F = torch.nn.functional


# ----------------------------------------------------------------------------------------------
# Reference implementations.


def panopticapi_single(gt_ids, gt_segments: dict, pred_ids, pred_segments: dict) -> dict:
  """panopticapi's `pq_compute_single_core` for one image: id maps (0 = void) and {id:
  {category_id, iscrowd}} -> {category_id: [tp, fp, fn, iou]}."""
  offset, void = 256 * 256 * 256, 0
  stat = collections.defaultdict(lambda: [0, 0, 0, 0.0])
  gt_segms = {k: dict(v) for k, v in gt_segments.items()}
  pred_segms = {k: dict(v) for k, v in pred_segments.items()}
  for segms, ids in ((gt_segms, gt_ids), (pred_segms, pred_ids)):
    for label, area in zip(*np.unique(ids, return_counts=True)):
      if label != void:
        segms[int(label)]["area"] = int(area)
  joint = np.asarray(gt_ids, np.uint64) * offset + np.asarray(pred_ids, np.uint64)
  gt_pred = {(int(j // offset), int(j % offset)): int(n)
             for j, n in zip(*np.unique(joint, return_counts=True))}
  gt_matched, pred_matched = set(), set()
  for (g, p), inter in gt_pred.items():
    if g not in gt_segms or p not in pred_segms or gt_segms[g]["iscrowd"] == 1:
      continue
    if gt_segms[g]["category_id"] != pred_segms[p]["category_id"]:
      continue
    union = pred_segms[p]["area"] + gt_segms[g]["area"] - inter - gt_pred.get((void, p), 0)
    iou = inter / union
    if iou > 0.5:
      s = stat[gt_segms[g]["category_id"]]
      s[0] += 1
      s[3] += iou
      gt_matched.add(g)
      pred_matched.add(p)
  crowd = {}
  for g, info in gt_segms.items():
    if g in gt_matched:
      continue
    if info["iscrowd"] == 1:
      crowd[info["category_id"]] = g
      continue
    stat[info["category_id"]][2] += 1
  for p, info in pred_segms.items():
    if p in pred_matched:
      continue
    inter = gt_pred.get((void, p), 0)
    if info["category_id"] in crowd:
      inter += gt_pred.get((crowd[info["category_id"]], p), 0)
    if inter / info["area"] > 0.5:
      continue
    stat[info["category_id"]][1] += 1
  return stat


def panopticapi_average(stat: dict, is_thing: dict, group: bool | None) -> tuple:
  """panopticapi's `pq_average`: (pq, sq, rq, n) over the categories of the group that occur."""
  pq = sq = rq = 0.0
  n = 0
  for cat, thing in is_thing.items():
    if group is not None and thing != group:
      continue
    tp, fp, fn, iou = stat.get(cat, [0, 0, 0, 0.0])
    if tp + fp + fn == 0:
      continue
    n += 1
    pq += iou / (tp + 0.5 * fp + 0.5 * fn)
    sq += iou / tp if tp != 0 else 0
    rq += tp / (tp + 0.5 * fp + 0.5 * fn)
  return pq / n, sq / n, rq / n, n


def eomt_panoptic_reference(mask_logits, class_logits, stuff_classes, mask_thresh,
                            overlap_thresh):
  """EoMT's `to_per_pixel_preds_panoptic` for one image, in torch: mask_logits (K, H, W),
  class_logits (K, C + 1) -> (segment ids (H, W), -1 void, [(segment id, class)])."""
  scores, classes = class_logits.softmax(dim=-1).max(-1)
  segments = -torch.ones(mask_logits.shape[-2:], dtype=torch.long)
  keep = classes.ne(class_logits.shape[-1] - 1) & (scores > mask_thresh)
  if not keep.any():
    return segments, []
  masks = mask_logits.sigmoid()
  mask_ids = (scores[keep][..., None, None] * masks[keep]).argmax(0)
  stuff_segment_ids, segment_id, out = {}, 0, []
  for k, class_id in enumerate(classes[keep].tolist()):
    orig_mask = masks[keep][k] >= 0.5
    new_mask = mask_ids == k
    final_mask = orig_mask & new_mask
    orig_area, new_area = orig_mask.sum().item(), new_mask.sum().item()
    if (orig_area == 0 or new_area == 0 or final_mask.sum().item() == 0
        or new_area / orig_area < overlap_thresh):
      continue
    if class_id in stuff_classes:
      if class_id in stuff_segment_ids:
        segments[final_mask] = stuff_segment_ids[class_id]
        continue
      stuff_segment_ids[class_id] = segment_id
    segments[final_mask] = segment_id
    out.append((segment_id, class_id))
    segment_id += 1
  return segments, out


def eomt_instance_reference(mask_logits, class_logits, top_k):
  """EoMT's instance `eval_step` for one image, in torch: masks, labels, scores, queries."""
  scores = class_logits.softmax(dim=-1)[:, :-1]
  labels = torch.arange(scores.shape[-1]).unsqueeze(0).repeat(scores.shape[0], 1).flatten(0, 1)
  topk_scores, topk_indices = scores.flatten(0, 1).topk(top_k, sorted=False)
  labels = labels[topk_indices]
  queries = topk_indices // scores.shape[-1]
  logits = mask_logits[queries]
  masks = logits > 0
  mask_scores = (logits.sigmoid().flatten(1) * masks.flatten(1)).sum(1) / (
      masks.flatten(1).sum(1) + 1e-6)
  return {"masks": masks.numpy(), "labels": labels.numpy(),
          "scores": (topk_scores * mask_scores).numpy(), "queries": queries.numpy()}


def segment_maps(categories: np.ndarray, instances: np.ndarray, stuff: set) -> tuple:
  """(category, instance) maps -> (segment ids, 0 void where category < 0, classes): one
  segment per (thing class, instance) and per stuff class."""
  ids = np.zeros(categories.shape, np.int64)
  classes = []
  keys = {}
  for (c, i) in sorted(set(zip(categories.ravel().tolist(), instances.ravel().tolist()))):
    if c < 0:
      continue
    key = (c, 0 if c in stuff else i)
    if key not in keys:
      classes.append(c)
      keys[key] = len(classes)
    ids[(categories == c) & (instances == i)] = keys[key]
  return ids, classes


def blocky(rng, shape, block, values):
  """A random map of `values` constant on block x block tiles."""
  coarse = rng.choice(values, (shape[0] // block, shape[1] // block))
  return np.kron(coarse, np.ones((block, block), np.int64))


# ----------------------------------------------------------------------------------------------
# PQ.

V, A, B, S, C = 0, 1, 2, 3, 4  # ground-truth segment ids of the hand case (0 = void)
GT = np.array([[A, A, A, B, B, V],
               [A, A, A, B, B, V],
               [S, S, S, S, C, C],
               [S, S, S, S, S, S]])
GT_CLASSES, GT_CROWD = [0, 0, 2, 1], [False, False, False, True]  # A, B things of class 0; S
# stuff (class 2); C a crowd region of class 1. Classes 0, 1 things, 2 stuff.
PRED = np.array([[1, 1, 1, 1, 2, 2],
                 [1, 1, 1, 2, 2, 2],
                 [3, 3, 3, 3, 4, 4],
                 [3, 3, 3, 3, 3, 3]])


def test_pq_by_hand():
  # a (7 px): A (6) + 1 px of B -> IoU 6 / (7 + 6 - 6) = 6/7. b (5 px): 3 px of B + 2 px of void
  # -> IoU 3 / (5 + 4 - 3 - 2) = 3/4. s = S -> IoU 1. c (class 1) lies on the class-1 crowd
  # region -> ignored. The crowd region is never a miss.
  s = pm.pq_stats(PRED, [0, 0, 2, 1], GT, GT_CLASSES, GT_CROWD, 3)
  assert s.tp.tolist() == [2, 0, 1] and s.fp.tolist() == [0, 0, 0] and s.fn.tolist() == [0] * 3
  np.testing.assert_allclose(s.iou, [6 / 7 + 3 / 4, 0, 1], atol=1e-12)
  r = pm.pq_results(s, ["a", "b", "s"], [True, True, False])
  pq0 = (6 / 7 + 3 / 4) / 2
  assert r["PQ"] == pytest.approx((pq0 + 1) / 2 * 100, abs=1e-9)
  assert r["PQ_th"] == pytest.approx(pq0 * 100) and r["RQ_th"] == pytest.approx(100)
  assert r["PQ_st"] == pytest.approx(100)
  assert r["PQ_classes"] == {"all": 2, "things": 1, "stuff": 1}
  assert np.isnan(r["per_class"][1]["PQ"])  # class 1 only has a crowd region: not counted

  # b as class 1: B is missed (FN of class 0); b is a class-1 FP (void 2/5 <= 1/2, and the
  # class-1 crowd region does not overlap it). c as class 0: a class-0 FP (crowd of class 1).
  s = pm.pq_stats(PRED, [0, 1, 2, 0], GT, GT_CLASSES, GT_CROWD, 3)
  assert (s.tp.tolist(), s.fp.tolist(), s.fn.tolist()) == ([1, 0, 1], [1, 1, 0], [1, 0, 0])
  r = pm.pq_results(s, ["a", "b", "s"], [True, True, False])
  rows = r["per_class"]
  assert rows[0]["PQ"] == pytest.approx(6 / 7 / 2 * 100)  # 6/7 / (1 + 1/2 + 1/2)
  assert rows[0]["SQ"] == pytest.approx(6 / 7 * 100) and rows[0]["RQ"] == pytest.approx(50)
  assert (rows[1]["PQ"], rows[1]["SQ"], rows[1]["RQ"]) == (0, 0, 0)
  assert r["PQ"] == pytest.approx((3 / 7 + 0 + 1) / 3 * 100)
  assert r["SQ"] == pytest.approx((6 / 7 + 0 + 1) / 3 * 100)
  assert r["RQ"] == pytest.approx((0.5 + 0 + 1) / 3 * 100)
  assert r["PQ_th"] == pytest.approx(3 / 14 * 100)
  text = metrics.format_table(r)
  assert "| a     | thing |  42.86 |  85.71 |  50.00 |" in text
  assert "| Things |  21.43 |  42.86 |  25.00 |   2 |" in text


def _torchmetrics_map(categories, instances):
  """torchmetrics' (1, H, W, 2) [category, instance] input; void (-1) as an unknown id (99)."""
  return torch.from_numpy(np.stack([np.where(categories < 0, 99, categories), instances],
                                   -1)[None])


def test_pq_against_torchmetrics_on_random_maps():
  things, stuff = [0, 1, 2], [3, 4]
  rng = np.random.default_rng(0)
  tm = __import__("torchmetrics.detection", fromlist=["PanopticQuality"]).PanopticQuality(
      things=set(things), stuffs=set(stuff), return_sq_and_rq=True, return_per_class=True)
  stats = pm.PQStats.zeros(5)
  for _ in range(12):
    gt_cat = blocky(rng, (32, 40), 4, [-1, 0, 1, 2, 3, 4])
    gt_ins = blocky(rng, (32, 40), 8, [0, 1, 2])
    pred_cat, pred_ins = gt_cat.copy(), gt_ins.copy()
    change = blocky(rng, (32, 40), 4, [0, 0, 1])
    pred_cat = np.where(change > 0, blocky(rng, (32, 40), 4, [0, 1, 2, 3, 4]), pred_cat)
    pred_ins = np.where(blocky(rng, (32, 40), 2, [0, 0, 0, 1]) > 0, 2, pred_ins)
    pred_cat = np.where(pred_cat < 0, 3, pred_cat)  # no predicted void (see module docstring)
    gt, gt_classes = segment_maps(gt_cat, gt_ins, set(stuff))
    pred, pred_classes = segment_maps(pred_cat, pred_ins, set(stuff))
    stats.add(pm.pq_stats(pred, pred_classes, gt, gt_classes, [False] * len(gt_classes), 5))
    tm.update(_torchmetrics_map(pred_cat, pred_ins), _torchmetrics_map(gt_cat, gt_ins))
  ours = pm.pq_results(stats, list("abcde"), [True] * 3 + [False] * 2)
  per_class = tm.compute().numpy()  # (C, 3) PQ, SQ, RQ
  assert stats.tp.sum() > 20 and stats.fp.sum() > 20 and stats.fn.sum() > 20
  for row, ref in zip(ours["per_class"], per_class):
    np.testing.assert_allclose([row["PQ"], row["SQ"], row["RQ"]], ref * 100, atol=1e-9)
  np.testing.assert_allclose([ours["PQ"], ours["SQ"], ours["RQ"]], per_class.mean(0) * 100,
                             atol=1e-9)  # every class occurs: panopticapi's mean = the mean


def test_pq_against_panopticapi_with_crowd_and_void():
  rng = np.random.default_rng(1)
  is_thing = {0: True, 1: True, 2: False, 3: False}
  totals = pm.PQStats.zeros(4)
  reference = collections.defaultdict(lambda: [0, 0, 0, 0.0])
  for _ in range(20):
    n_gt = int(rng.integers(3, 8))
    gt = blocky(rng, (24, 24), 4, np.arange(n_gt + 1))
    gt_classes = rng.integers(0, 4, n_gt)
    gt_crowd = (rng.random(n_gt) < 0.25) & np.isin(gt_classes, [0, 1])
    pred = np.where(blocky(rng, (24, 24), 2, [0, 0, 0, 1]) > 0,
                    blocky(rng, (24, 24), 2, np.arange(n_gt + 2)), gt)
    pred_classes = np.where(rng.random(n_gt + 1) < 0.2, rng.integers(0, 4, n_gt + 1),
                            np.append(gt_classes, rng.integers(0, 4)))
    totals.add(pm.pq_stats(pred, pred_classes, gt, gt_classes, gt_crowd, 4))
    present = lambda ids, n: [i for i in range(1, n + 1) if (ids == i).any()]  # noqa: E731
    gt_segs = {i: {"category_id": int(gt_classes[i - 1]), "iscrowd": int(gt_crowd[i - 1])}
               for i in present(gt, n_gt)}
    gt_ids = np.where(np.isin(gt, list(gt_segs)), gt, 0)
    pred_segs = {i: {"category_id": int(pred_classes[i - 1]), "iscrowd": 0}
                 for i in present(pred, n_gt + 1)}
    for cat, s in panopticapi_single(gt_ids, gt_segs, pred, pred_segs).items():
      reference[cat] = [a + b for a, b in zip(reference[cat], s)]
  for cat in range(4):
    tp, fp, fn, iou = reference[cat]
    assert (totals.tp[cat], totals.fp[cat], totals.fn[cat]) == (tp, fp, fn), cat
    assert totals.iou[cat] == pytest.approx(iou, abs=1e-9)
  assert sum(r[1] for r in reference.values()) > 5  # false positives, some ignored on crowd
  ours = pm.pq_results(totals, list("abcd"), list(is_thing.values()))
  for suffix, group in (("", None), ("_th", True), ("_st", False)):
    pq, sq, rq, n = panopticapi_average(reference, is_thing, group)
    np.testing.assert_allclose([ours["PQ" + suffix], ours["SQ" + suffix], ours["RQ" + suffix]],
                               np.asarray([pq, sq, rq]) * 100, atol=1e-9)


# ----------------------------------------------------------------------------------------------
# Post-processing.

IS_THING = [True, True, False]  # classes 0, 1 things, 2 stuff; class 3 = no object


def _logits(probs) -> np.ndarray:
  return np.log(np.asarray(probs, np.float64)).astype(np.float32)


def _box(y0, y1, x0, x1, shape=(8, 10), inside=8.0, outside=-8.0) -> np.ndarray:
  m = np.full(shape, outside, np.float32)
  m[y0:y1, x0:x1] = inside
  return m


def test_panoptic_thresholds_stuff_merged_things_apart():
  class_logits = _logits([[0.9, 0.04, 0.03, 0.03],  # thing 0, top left
                          [0.85, 0.05, 0.05, 0.05],  # thing 0 again, top middle: apart
                          [0.02, 0.02, 0.95, 0.01],  # stuff, bottom left
                          [0.02, 0.02, 0.93, 0.03],  # stuff, bottom middle: merged
                          [0.05, 0.79, 0.06, 0.10],  # class 1 at 0.79 <= 0.8: dropped
                          [0.02, 0.03, 0.05, 0.90]])  # no object: dropped
  mask_logits = np.stack([_box(0, 4, 0, 4), _box(0, 4, 4, 8), _box(4, 8, 0, 4),
                          _box(4, 8, 4, 8), _box(0, 8, 8, 10), _box(0, 8, 0, 10)])
  ids, segments = panoptic.panoptic_inference(class_logits, mask_logits, IS_THING, 0.8, 0.8)
  expected = np.zeros((8, 10), np.int32)
  expected[:4, :4], expected[:4, 4:8], expected[4:, :8] = 1, 2, 3
  np.testing.assert_array_equal(ids, expected)  # columns 8, 9: void
  assert [(s["id"], s["class_id"], s["isthing"], s["query"]) for s in segments] == [
      (1, 0, True, 0), (2, 0, True, 1), (3, 2, False, 2)]
  assert segments[0]["score"] == pytest.approx(0.9, abs=1e-6)
  class_logits[4] = _logits([0.05, 0.81, 0.04, 0.10])  # now above the threshold
  ids, segments = panoptic.panoptic_inference(class_logits, mask_logits, IS_THING, 0.8, 0.8)
  expected[:, 8:] = 4
  np.testing.assert_array_equal(ids, expected)
  assert [(s["id"], s["class_id"]) for s in segments] == [(1, 0), (2, 0), (3, 2), (4, 1)]
  ids, segments = panoptic.panoptic_inference(class_logits, mask_logits, IS_THING,
                                              object_mask_threshold=0.86, overlap_threshold=0.8)
  assert [(s["id"], s["class_id"]) for s in segments] == [(1, 0), (2, 2)]  # 0.85 query gone


def test_panoptic_overlap_filter():
  class_logits = _logits([[0.9, 0.04, 0.03, 0.03],
                          [0.05, 0.85, 0.05, 0.05],
                          [0.08, 0.82, 0.05, 0.05],
                          [0.95, 0.02, 0.02, 0.01]])
  # q1's mask: the right columns (16 px) and q0's box (16 px), where q0 scores higher: it wins
  # 16 of its 32 px -> 0.5 < 0.8, dropped, its columns void. q2 wins 16 of its 20 px (q3 has
  # the 5th column) -> exactly 0.8: kept.
  q1 = np.maximum(_box(0, 8, 8, 10), _box(0, 4, 0, 4))
  q2 = _box(4, 8, 0, 5)
  mask_logits = np.stack([_box(0, 4, 0, 4), q1, q2, _box(4, 8, 4, 5)])
  ids, segments = panoptic.panoptic_inference(class_logits, mask_logits, IS_THING, 0.8, 0.8)
  expected = np.zeros((8, 10), np.int32)
  expected[:4, :4], expected[4:, :4], expected[4:, 4] = 1, 2, 3
  np.testing.assert_array_equal(ids, expected)
  assert [(s["class_id"], s["query"]) for s in segments] == [(0, 0), (1, 2), (0, 3)]
  ids, segments = panoptic.panoptic_inference(class_logits, mask_logits, IS_THING,
                                              object_mask_threshold=0.8, overlap_threshold=0.81)
  assert [s["query"] for s in segments] == [0, 3]
  assert (ids[4:, :4] == 0).all()


@pytest.mark.parametrize("seed,thresholds", [(0, (0.8, 0.8)), (1, (0.5, 0.5)),
                                             (2, (0.3, 0.0))])
def test_panoptic_against_eomt_reference(seed, thresholds):
  rng = np.random.default_rng(seed)
  k, c = 12, 6
  class_logits = (rng.normal(size=(k, c + 1)) * 4).astype(np.float32)
  class_logits[np.arange(k), rng.integers(0, c + 1, k)] += 6  # some confident queries
  coarse = (rng.normal(size=(1, k, 5, 6)) - 1.0).astype(np.float32) * 6  # blobs, ~1/6 > 0
  mask_logits = F.interpolate(torch.from_numpy(coarse), (37, 45), mode="bilinear")[0].numpy()
  is_thing = [True, True, True, False, False, False]
  ids, segments = panoptic.panoptic_inference(class_logits, mask_logits, is_thing, *thresholds)
  ref, ref_segments = eomt_panoptic_reference(torch.from_numpy(mask_logits),
                                              torch.from_numpy(class_logits), {3, 4, 5},
                                              *thresholds)
  np.testing.assert_array_equal(ids, ref.numpy() + 1)
  assert [(s["id"], s["class_id"]) for s in segments] == [(i + 1, c) for i, c in ref_segments]
  assert len(segments) >= 5 and 0.3 < (ids == 0).mean() < 0.8


def test_instance_topk_and_scores():
  class_logits = _logits([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.46, 0.44, 0.1]])
  mask_logits = np.stack([_box(0, 4, 0, 4, inside=2.0, outside=-3.0),
                          _box(4, 6, 0, 4, inside=4.0, outside=-3.0),
                          np.full((8, 10), -1.0, np.float32)])
  out = panoptic.instance_inference(class_logits, mask_logits, top_k=3)
  # (query, class) pairs by probability: (1, 1) 0.7, (0, 0) 0.6, (2, 0) 0.46.
  assert out["queries"].tolist() == [1, 0, 2] and out["labels"].tolist() == [1, 0, 0]
  sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
  np.testing.assert_allclose(out["scores"], [0.7 * 8 * sig(4) / (8 + 1e-6),
                                             0.6 * 16 * sig(2) / (16 + 1e-6), 0.0], rtol=1e-5)
  np.testing.assert_array_equal(out["masks"][1], mask_logits[0] > 0)
  assert not out["masks"][2].any()
  rng = np.random.default_rng(3)
  class_logits = rng.normal(size=(12, 5)).astype(np.float32) * 3
  mask_logits = rng.normal(size=(12, 9, 11)).astype(np.float32)
  out = panoptic.instance_inference(class_logits, mask_logits, top_k=10)
  ref = eomt_instance_reference(torch.from_numpy(mask_logits), torch.from_numpy(class_logits),
                                10)
  ours_order = np.lexsort((out["labels"], out["queries"]))
  ref_order = np.lexsort((ref["labels"], ref["queries"]))
  for key in ("queries", "labels", "masks"):
    np.testing.assert_array_equal(out[key][ours_order], ref[key][ref_order])
  np.testing.assert_allclose(out["scores"][ours_order], ref["scores"][ref_order], rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Instance AP.


def _ap(images, dets, names=("a", "b")):
  """`mask_ap` of images (truth segment map, classes, crowd flags) and their detections."""
  acc = pm.InstanceAccumulator()
  for image_id, (gt, gt_classes, crowd) in enumerate(images):
    masks, classes, scores = dets.get(image_id, (np.zeros((0, *gt.shape), bool), [], []))
    acc.add_image(image_id, gt, gt_classes, crowd, masks, classes, scores)
  return pm.mask_ap(acc, list(names))


def test_mask_ap_hand_cases():
  gt = np.zeros((40, 40), np.int32)
  gt[2:12, 2:12], gt[20:30, 5:25], gt[30:38, 30:38] = 1, 2, 3  # 100, 200, 64 px: all small
  image = (gt, [0, 0, 1], [False, False, False])
  perfect = (np.stack([gt == 1, gt == 2, gt == 3]), [0, 0, 1], [0.9, 0.8, 0.7])
  r = _ap([image, image], {0: perfect, 1: perfect})
  assert [r["AP"], r["AP50"], r["AP75"], r["APs"]] == pytest.approx([100.0] * 4)
  assert np.isnan(r["APm"]) and np.isnan(r["APl"])  # no medium or large ground truth
  assert [p["AP"] for p in r["per_class"]] == pytest.approx([100.0, 100.0])
  # Class 0 misses its second object: precision 1 up to recall 1/2, so 51 of COCO's 101
  # recall points (0, 0.01, ..., 0.5) have precision 1: AP 51/101. A false positive ranked
  # above the hit halves that precision.
  miss = (np.stack([gt == 1, gt == 3]), [0, 1], [0.9, 0.7])
  r = _ap([image], {0: miss})
  assert r["per_class"][0]["AP"] == pytest.approx(51 / 101 * 100)
  assert r["per_class"][1]["AP"] == pytest.approx(100.0)
  fp_first = (np.stack([gt == 1, gt == 0, gt == 3]), [0, 0, 1], [0.9, 0.95, 0.7])
  r = _ap([image], {0: fp_first})
  assert r["per_class"][0]["AP"] == pytest.approx(51 / 101 * 50)
  # A detection on a crowd region of its class is ignored: still 100.
  crowd_image = (gt, [0, 0, 1], [False, True, False])
  on_crowd = (np.stack([gt == 1, gt == 2, gt == 3]), [0, 0, 1], [0.9, 0.95, 0.7])
  r = _ap([crowd_image], {0: on_crowd})
  assert r["AP"] == pytest.approx(100.0)
  r = _ap([image], {})  # no detections at all
  assert r["AP"] == 0.0


# ----------------------------------------------------------------------------------------------
# Geometry: long-side resize, black padding, logits back at the original size.


def test_long_side_resize_pad_and_logits_geometry():
  assert T.test_size(480, 640, "long_side", (640, 640), 1.0, 32, 0) == (480, 640)
  assert T.test_size(500, 375, "long_side", (640, 640), 1.0, 32, 0) == (640, 480)
  assert T.test_size(427, 640, "long_side", (640, 640), 1.0, 32, 0) == (427, 640)
  assert T.test_size(100, 300, "long_side", (64, 64), 1.0, 32, 0) == (21, 64)  # round(21.33)
  assert T.test_size(1000, 1500, "long_side", (1280, 1280), 1.0, 32, 0) == (
      853, 1280)  # round(853.33)
  rng = np.random.default_rng(4)
  image = rng.integers(0, 256, (100, 300, 3), dtype=np.uint8)
  segments = np.zeros((100, 300), np.int32)
  record = T.MultiScaleResize(resize="long_side", scale=(64, 64), ratios=(1.0,), size_divisor=32,
                              min_size=0).map(
      {"image": image, "name": "x", "segments": segments, "image_id": 7})
  resized = record["images"][0]
  assert record["image_id"] == 7 and record["segments"] is segments and "label" not in record
  np.testing.assert_array_equal(resized, np.asarray(Image.fromarray(image).resize(
      (64, 21), Image.BILINEAR)))

  mean, std = (100.0, 110.0, 120.0), (50.0, 60.0, 70.0)

  def apply_fn(params, x):  # mask logits: 4x4 means of the normalised input's channels
    b, s = x.shape[0], x.shape[1]
    m = x.reshape(b, s // 4, 4, s // 4, 4, 3).mean((2, 4)) * params
    return jnp.zeros((b, 3, 2)), jnp.moveaxis(m, -1, 1)

  predictor = inference.MaskPredictor(apply_fn, jnp.float32(1.0), (64, 64), mean=mean, std=std)
  class_logits, mask_logits = predictor.logits([resized])
  low = np.array(mask_logits)[0]  # (3, 16, 16)
  assert class_logits.shape == (1, 3, 2) and low.shape == (3, 16, 16)
  black = (0 - np.asarray(mean)) / np.asarray(std)
  np.testing.assert_allclose(low[:, 6:, :], np.broadcast_to(black[:, None, None], (3, 10, 16)),
                             rtol=1e-6)  # rows 24..63 of the input: all padding, black
  x = (resized.astype(np.float32) - np.float32(mean)) / np.float32(std)
  np.testing.assert_allclose(low[:, :5], np.moveaxis(x[:20].reshape(5, 4, 16, 4, 3).mean(
      (1, 3)), -1, 0), atol=1e-5)
  out = np.asarray(predictor.at_size(mask_logits[0], resized.shape[:2], (100, 300)))
  assert out.shape == (128, 320, 3)  # buffer: multiples of 64
  ref = F.interpolate(torch.from_numpy(low[None]), (64, 64), mode="bilinear")[..., :21, :64]
  ref = F.interpolate(ref, (100, 300), mode="bilinear")[0].numpy()
  np.testing.assert_allclose(np.moveaxis(out[:100, :300], -1, 0), ref, atol=1e-5)
  with pytest.raises(ValueError, match="does not fit the 64x64 model input"):
    predictor.logits([image])


# ----------------------------------------------------------------------------------------------
# eval.py end to end.

VAL_SIZES = ((48, 64), (64, 40), (64, 64))
OVERLAP = 0.3  # the random model's segments survive this, not 0.8 (module docstring)


def _config(root: str) -> ml_collections.ConfigDict:
  c = demo.get_config("eomt")
  c.update_from_flattened_dict({
      "dataset.name": "coco_panoptic", "dataset.root": root, "eval.task": "panoptic",
      "eval.resize": "long_side", "eval.scale": (64, 64), "eval.window_batch": 1,
      "eval.overlap_threshold": OVERLAP})
  return c


def _flags(root: str) -> list[str]:
  return ["--config", "configs/demo.py:eomt", "--config.dataset.name=coco_panoptic",
          f"--config.dataset.root={root}", "--config.eval.task=panoptic",
          "--config.eval.resize=long_side", "--config.eval.scale=(64,64)",
          "--config.eval.window_batch=1", f"--config.eval.overlap_threshold={OVERLAP}"]


def _read_split(root: str) -> tuple[dict, str]:
  path = os.path.join(root, "annotations", "panoptic_val2017.json")
  with open(path) as f:
    return json.load(f), path


def _crop_val(root: str) -> dict:
  """Crops the val images to VAL_SIZES; their ground truth becomes void for now. Returns the
  cropped fabricated truth: name -> (ids, {id: category_id})."""
  data, path = _read_split(root)
  originals = {}
  for image, ann, (h, w) in zip(data["images"], data["annotations"], VAL_SIZES):
    stem = os.path.splitext(image["file_name"])[0]
    jpg = os.path.join(root, "val2017", image["file_name"])
    png = os.path.join(root, "annotations", "panoptic_val2017", ann["file_name"])
    Image.fromarray(np.asarray(Image.open(jpg))[:h, :w]).save(jpg, quality=95)
    ids = coco_panoptic.read_panoptic_png(png)[:h, :w]
    originals[stem] = (ids, {s["id"]: s["category_id"] for s in ann["segments_info"]})
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(png)
    image.update(height=h, width=w)
    ann["segments_info"] = []
  with open(path, "w") as f:
    json.dump(data, f)
  return originals


def _reference_predictions(config, model, variables, categories) -> dict:
  """name -> (pred ids (H, W), [class per segment], instance detections), from the predictor's
  logits (one image per call, as the CLI runs) through the torch post-processing."""
  dataset, _ = pipeline.make_panoptic_eval_dataset(config, "val", 0, 1)
  predictor = panoptic.make_mask_predictor(model, variables, config)
  stuff = {i for i, t in enumerate(categories.is_thing) if not t}
  out = {}
  for ex in dataset:
    resized, (h, w) = ex["images"][0], ex["image"].shape[:2]
    class_logits, mask_logits = predictor.logits([resized])
    masks = np.asarray(predictor.at_size(mask_logits[0], resized.shape[:2], (h, w)))[:h, :w]
    ml = torch.from_numpy(np.moveaxis(masks, -1, 0).copy())
    cl = torch.from_numpy(np.array(class_logits[0]))
    seg, segs = eomt_panoptic_reference(ml, cl, stuff, 0.8, OVERLAP)
    out[ex["name"]] = (seg.numpy() + 1, [c for _, c in segs],
                       eomt_instance_reference(ml, cl, min(100, cl.numel() - len(cl))),
                       ex["image_id"])  # top-k over the K * C = 96 (query, class) pairs
  return out


class _Truth:
  """A ground-truth segment map being written: segments added in order, stuff of one class
  one segment."""

  def __init__(self, shape, categories):
    self.ids = np.zeros(shape, np.int64)
    self.info, self.stuff, self.categories = [], {}, categories

  def add(self, mask: np.ndarray, category_id: int, crowd: int = 0) -> None:
    if not mask.any():
      return
    cats = self.categories
    thing = cats.is_thing[cats.contiguous[category_id]]
    if not thing and category_id in self.stuff:
      self.ids[mask] = self.stuff[category_id]
      return
    seg_id = len(self.info) + 1
    self.ids[mask] = seg_id
    if not thing:
      self.stuff[category_id] = seg_id
    self.info.append({"id": seg_id, "category_id": category_id, "iscrowd": crowd})


def _write_ground_truth(root: str, preds: dict, originals: dict, categories) -> None:
  """Each image's truth: its left half the prediction's segments, its right half the
  fabricated truth (stuff of one class one segment); the first right-half thing of the first
  image is crowd."""
  data, path = _read_split(root)
  for n, ann in enumerate(data["annotations"]):
    stem = os.path.splitext(ann["file_name"])[0]
    pred, pred_classes, _, _ = preds[stem]
    orig, orig_cats = originals[stem]
    h, w = pred.shape
    left = np.arange(w)[None, :] < w // 2
    truth = _Truth((h, w), categories)
    for i, c in enumerate(pred_classes):
      truth.add((pred == i + 1) & left, categories.coco_ids[c])
    crowd_done = n != 0
    for seg_id, cat in orig_cats.items():
      thing = categories.is_thing[categories.contiguous[cat]]
      mask = (orig == seg_id) & ~left
      truth.add(mask, cat, int(thing and not crowd_done and mask.any()))
      crowd_done |= bool(thing and mask.any())
    for seg in truth.info:
      seg["area"] = int((truth.ids == seg["id"]).sum())
    Image.fromarray(panoptic.id_to_rgb(truth.ids)).save(
        os.path.join(root, "annotations", "panoptic_val2017", ann["file_name"]))
    ann["segments_info"] = truth.info
  with open(path, "w") as f:
    json.dump(data, f)


def _reference_ap(root: str, preds: dict, categories) -> list[float]:
  """COCOeval's AP / AP50 / AP75 / APs / APm / APl (percent, NaN for -1) of the reference
  detections of thing classes against the written truth (crowd as iscrowd)."""
  from pycocotools import mask as mask_util  # pylint: disable=g-import-not-at-top
  from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
  from pycocotools.cocoeval import COCOeval  # pylint: disable=g-import-not-at-top
  data, _ = _read_split(root)
  thing = categories.is_thing
  images, anns, dets = [], [], []
  for ann in data["annotations"]:
    stem = os.path.splitext(ann["file_name"])[0]
    ids = coco_panoptic.read_panoptic_png(
        os.path.join(root, "annotations", "panoptic_val2017", ann["file_name"]))
    image_id = preds[stem][3]
    images.append({"id": image_id, "height": ids.shape[0], "width": ids.shape[1]})
    for s in ann["segments_info"]:
      c = categories.contiguous[s["category_id"]]
      if thing[c]:
        rle = mask_util.encode(np.asfortranarray((ids == s["id"]).astype(np.uint8)))
        anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": c,
                     "segmentation": rle, "area": float((ids == s["id"]).sum()),
                     "iscrowd": s["iscrowd"]})
    inst = preds[stem][2]
    for mask, label, score in zip(inst["masks"], inst["labels"], inst["scores"]):
      if thing[label]:
        dets.append({"image_id": image_id, "category_id": int(label), "score": float(score),
                     "segmentation": mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))})
  gt = COCO()
  gt.dataset = {"images": images, "annotations": anns, "categories": [
      {"id": i} for i in range(len(thing)) if thing[i]]}
  with contextlib.redirect_stdout(io.StringIO()):
    gt.createIndex()
    e = COCOeval(gt, gt.loadRes(dets), "segm")
    e.evaluate()
    e.accumulate()
    e.summarize()
  return [float("nan") if v < 0 else v * 100 for v in e.stats[:6]]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
  """The fabricated copy, the tiny bundle, the in-process references, and eval.py run by one
  process and by two (launched together)."""
  tmp = tmp_path_factory.mktemp("panoptic_eval")
  root = fabricate.write_coco_panoptic(str(tmp / "coco"), num_train=1, num_val=3, size=64)
  originals = _crop_val(root)
  config = _config(root)
  model = build_model(config.model)
  params = jax.tree.map(np.asarray, flax.linen.meta.unbox(
      jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]))
  # Confident classes: the random model's queries then pass the 0.8 score threshold.
  params["head"]["class_head"]["kernel"] = params["head"]["class_head"]["kernel"] * 30
  _, categories = pipeline.make_panoptic_eval_dataset(config, "val", 0, 1)
  bundle = bundle_lib.save_bundle(
      str(tmp / "bundle"), params, config.model, mean=config.mean, std=config.std,
      class_names=categories.names,
      categories=[{"id": i, "name": n, "isthing": int(t)} for i, n, t in zip(
          categories.coco_ids, categories.names, categories.is_thing)])
  preds = _reference_predictions(config, model, {"params": params}, categories)
  _write_ground_truth(root, preds, originals, categories)

  argv = ["eval.py", *_flags(root), "--checkpoint", bundle]
  outs = [str(tmp / name) for name in ("one", "mp0", "mp1")]
  address = f"127.0.0.1:{free_port()}"

  def popen(args):
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=device_env(1),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

  procs = [popen([*argv, "--output", outs[0], "--num_vis", "2"])]
  procs += [popen([*argv, "--output", outs[i + 1], "--num_vis", "0",
                   f"--coordinator_address={address}", "--num_processes=2",
                   f"--process_id={i}"]) for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in procs]
  failed = [f"process {i} exited with {p.returncode}:\n{err[-3000:]}"
            for i, (p, (_, err)) in enumerate(zip(procs, outputs)) if p.returncode]
  assert not failed, "\n\n".join(failed)
  stdout = [out for out, _ in outputs]
  runs = []
  for out in outs[:2]:
    with open(os.path.join(out, "eval_results.json")) as f:
      runs.append(json.load(f))
  assert not os.path.exists(os.path.join(outs[2], "eval_results.json"))  # process 0 writes
  return dict(root=root, preds=preds, categories=categories, one=runs[0], two=runs[1],
              stdout=stdout[0], out=outs[0], bundle=bundle)


def test_eval_py_pq_equals_references(evaluated):
  r, preds, categories = evaluated["one"], evaluated["preds"], evaluated["categories"]
  root = evaluated["root"]
  data, _ = _read_split(root)
  stat = collections.defaultdict(lambda: [0, 0, 0, 0.0])
  for ann in data["annotations"]:
    stem = os.path.splitext(ann["file_name"])[0]
    gt = coco_panoptic.read_panoptic_png(
        os.path.join(root, "annotations", "panoptic_val2017", ann["file_name"]))
    pred, pred_classes = preds[stem][:2]
    pred_segs = {i + 1: {"category_id": categories.coco_ids[c], "iscrowd": 0}
                 for i, c in enumerate(pred_classes)}
    gt_segs = {s["id"]: s for s in ann["segments_info"]}
    for cat, s in panopticapi_single(gt, gt_segs, pred, pred_segs).items():
      stat[cat] = [a + b for a, b in zip(stat[cat], s)]
  assert any(s["iscrowd"] for a in data["annotations"] for s in a["segments_info"])
  counts = [(row["TP"], row["FP"], row["FN"]) for row in r["per_class"]]
  assert counts == [tuple(stat[c][:3]) for c in categories.coco_ids]
  assert sum(c[0] for c in counts) >= 3 and sum(c[1] + c[2] for c in counts) >= 3
  is_thing = dict(zip(categories.coco_ids, categories.is_thing))
  for suffix, group in (("", None), ("_th", True), ("_st", False)):
    pq, sq, rq, _ = panopticapi_average(stat, is_thing, group)
    np.testing.assert_allclose([r["PQ" + suffix], r["SQ" + suffix], r["RQ" + suffix]],
                               np.asarray([pq, sq, rq]) * 100, atol=1e-9)
  assert 0 < r["PQ"] < 100
  np.testing.assert_allclose([np.nan if r[k] is None else r[k] for k in metrics.AP_KEYS],
                             _reference_ap(root, preds, categories), atol=1e-9)
  assert r["images"] == 3 and r["protocol"]["task"] == "panoptic"
  assert r["protocol"]["resize"] == "long_side" and r["protocol"]["scale"] == [64, 64]
  assert r["protocol"]["overlap_threshold"] == OVERLAP
  assert r["protocol"]["object_mask_threshold"] == 0.8
  lines = evaluated["stdout"].splitlines()
  assert lines[0].split() == ["|", "Class", "|", "Kind", "|", "PQ", "|", "SQ", "|", "RQ", "|",
                              "AP", "|"]
  assert any(line.startswith("| striped_disc ") and "| thing |" in line for line in lines)
  assert any(line.startswith("| background ") and line.rstrip().endswith(" - |")
             for line in lines)  # no AP for stuff
  assert any(line.startswith("| All    |") for line in lines)
  assert any(line.startswith("PQ: ") for line in lines)
  pictures = sorted(os.listdir(os.path.join(evaluated["out"], "pictures")))
  assert len(pictures) == 2
  with Image.open(os.path.join(evaluated["out"], "pictures", pictures[0])) as im:
    # The 48 x 64 image enlarged x 6 (short side 288 >= 256), 4 titled panels 4 px apart, a
    # legend of at least one class below.
    assert im.size[0] == 4 * 6 * 64 + 3 * 4 and im.size[1] >= 6 * 48 + 42


def test_two_processes_equal_one(evaluated):
  one, two = evaluated["one"], evaluated["two"]
  assert one["images"] == two["images"] == 3
  assert one["protocol"] == two["protocol"]
  for a, b in zip(one["per_class"], two["per_class"]):
    assert (a["TP"], a["FP"], a["FN"]) == (b["TP"], b["FP"], b["FN"])
  for key in (*metrics.PQ_KEYS, *metrics.AP_KEYS):
    if one[key] is None:
      assert two[key] is None, key
    else:
      assert two[key] == pytest.approx(one[key], abs=1e-9), key


def test_predict_py_panoptic_writes_coco_format(evaluated, tmp_path):
  """predict.py --task panoptic: COCO panoptic PNGs and json whose segments are the
  reference predictions (the model input here is the bundle's 12 x 8 = 96 px grid, so the
  size is given as 64 to match the evaluation)."""
  root, preds, categories = evaluated["root"], evaluated["preds"], evaluated["categories"]
  out = tmp_path / "pred"
  proc = subprocess.run(
      [sys.executable, "predict.py", "--task", "panoptic", "--checkpoint", evaluated["bundle"],
       "--input", os.path.join(root, "val2017"), "--output", str(out), "--size", "64",
       "--overlap-threshold", str(OVERLAP)], cwd=ROOT, env=device_env(1), capture_output=True,
      text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out / "panoptic.json") as f:
    result = json.load(f)
  assert [c["id"] for c in result["categories"]] == list(categories.coco_ids)
  assert len(result["annotations"]) == 3
  for ann in result["annotations"]:
    stem = os.path.splitext(ann["file_name"])[0]
    assert ann["image_id"] == int(stem)
    ids = coco_panoptic.read_panoptic_png(str(out / "panoptic" / ann["file_name"]))
    pred, pred_classes = preds[stem][:2]
    np.testing.assert_array_equal(ids, pred)
    assert [s["category_id"] for s in ann["segments_info"]] == [
        categories.coco_ids[c] for c in pred_classes]
    for s in ann["segments_info"]:
      assert s["area"] == int((ids == s["id"]).sum())
      assert s["isthing"] == int(categories.is_thing[categories.contiguous[s["category_id"]]])
    assert (out / f"{stem}_overlay.jpg").exists()


def test_semantic_and_panoptic_eval_records_of_a_panoptic_dataset(tmp_path):
  """Task "semantic" on a panoptic dataset scores its class-id map (crowd dropped as in
  training); "panoptic" keeps every segment, crowd flagged, as one segment map."""
  root = fabricate.write_coco_panoptic(str(tmp_path / "coco"), num_train=1, num_val=2,
                                       size=32, crowd_every=1)
  c = _config(root)
  c.eval.task = "semantic"
  ex = pipeline.make_eval_dataset(c, "val")[0][0]
  source = coco_panoptic.coco_panoptic_source(root, "val")
  np.testing.assert_array_equal(ex["label"], coco_panoptic.semantic_label(source[0]))
  assert (ex["label"] == 255).any()  # the crowd object
  ds, categories = pipeline.make_panoptic_eval_dataset(c, "val")
  ex, full = ds[1], coco_panoptic.coco_panoptic_source(root, "val", drop_crowd=False)[1]
  assert ex["image_id"] == 1 and ex["images"][0].shape == (64, 64, 3)
  assert ex["segment_is_crowd"].tolist() == full["is_crowd"].tolist()
  assert ex["segment_is_crowd"][-1] and not ex["segment_is_crowd"][:-1].any()
  for i, mask in enumerate(full["masks"]):
    np.testing.assert_array_equal(ex["segments"] == i + 1, mask)
  np.testing.assert_array_equal(ex["segment_classes"], full["class_ids"])
  assert categories.coco_ids == (*fabricate.THING_IDS, fabricate.STUFF_ID)


def test_paper_config_protocol():
  from configs import eomt_vit_l_coco_panoptic  # pylint: disable=g-import-not-at-top
  c = eomt_vit_l_coco_panoptic.get_config()
  post = panoptic.PostProcessing.from_config(c)
  assert post == panoptic.PostProcessing("panoptic", 0.8, 0.8, 100, True)
  record = panoptic.mask_protocol_record(c, "val")
  assert (record["resize"], record["scale"]) == ("long_side", [640, 640])
  assert c.eval.best_metric == "PQ"
