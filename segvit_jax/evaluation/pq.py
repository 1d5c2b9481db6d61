"""Panoptic quality (PQ, SQ, RQ) with COCO panopticapi's semantics, and COCO instance mask AP
(pycocotools), accumulated over a dataset and across processes (EoMT Sec. 4.1 "Evaluation.":
COCO panoptic PQ, Tables 3-4; COCO instance AP, Table 6).

PQ (Kirillov et al., "Panoptic Segmentation"; `panopticapi.evaluation.pq_compute_single_core`),
per image (`pq_stats`), with segment maps whose 0 is void:
  - a predicted and a ground-truth segment of the same class match if IoU > 0.5, where the
    union leaves out the predicted pixels on ground-truth void: IoU = |p & g| / (|p| + |g| -
    |p & g| - |p & void|); such matches are unique, so no assignment is needed;
  - crowd ground-truth segments never match and are no false negatives; every other unmatched
    ground-truth segment is a false negative of its class;
  - an unmatched predicted segment is a false positive of its class unless more than half of
    it lies on void or on the crowd segment of its class (the image's last one in
    `segments_info` order, as panopticapi's dict keeps it; COCO has at most one per class).
Per class c: PQ = sum IoU / (TP + FP / 2 + FN / 2), SQ = sum IoU / TP (0 without TP), RQ = TP /
(TP + FP / 2 + FN / 2); PQ / SQ / RQ of All, Things and Stuff are means over the classes of the
group that occur (TP + FP + FN > 0), in percent. A class that never occurs has NaN (`null` in
JSON; panopticapi reports 0 and leaves it out of the means as well). The per-class sums
(`PQStats`) add up over images and processes.

Instance AP (`mask_ap`): pycocotools' COCOeval with iouType "segm" on RLE masks: AP (IoU .50:.95),
AP50, AP75, APs / APm / APl (areas < 32^2, 32^2..96^2, > 96^2 by the ground-truth segment's
pixel count, or the json's `area` where the dataset gives it, as COCO instances do), at most 100
detections per image, crowd ground truth as COCO's `iscrowd` (a detection whose best match is a
crowd region is neither a hit nor a false positive; COCO's crowd IoU divides by the detection's
area only). Ground truth comes as a segment map (panoptic) or a mask stack whose masks may
overlap (instance datasets); per-class
AP from COCOeval's precision table. Detections and ground truth of every process are gathered
(`allgather_objects`) and evaluated on process 0; the numbers are broadcast to the others.
The result keys are `metrics.PQ_KEYS` / `metrics.AP_KEYS`; `metrics.format_table` prints them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import pickle
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from segvit_jax.evaluation import metrics



# ----------------------------------------------------------------------------------------------
# PQ.


@dataclasses.dataclass
class PQStats:
  """Per-class sums over images: true positives, false positives, false negatives (int64) and
  the IoU sum of the true positives (float64), each (C,)."""
  tp: np.ndarray
  fp: np.ndarray
  fn: np.ndarray
  iou: np.ndarray

  @classmethod
  def zeros(cls, num_classes: int) -> "PQStats":
    z = lambda dtype: np.zeros(num_classes, dtype)  # noqa: E731
    return cls(z(np.int64), z(np.int64), z(np.int64), z(np.float64))

  def add(self, other: "PQStats") -> None:
    """Adds `other`'s sums to these, in place."""
    self.tp += other.tp
    self.fp += other.fp
    self.fn += other.fn
    self.iou += other.iou

  def to_array(self) -> np.ndarray:
    """(4, C) float64 [tp, fp, fn, iou] (counts exact below 2^53), for cross-process sums."""
    return np.stack([self.tp, self.fp, self.fn, self.iou]).astype(np.float64)

  @classmethod
  def from_array(cls, a: np.ndarray) -> "PQStats":
    a = np.asarray(a, np.float64)
    return cls(*(np.rint(a[i]).astype(np.int64) for i in range(3)), a[3].copy())

  def allreduce(self) -> "PQStats":
    """The sums over all processes (every process must call this). Sent as bytes: device
    collectives would pass the float64 IoU sums through float32 (x64 is off)."""
    if jax.process_count() == 1:
      return self
    return PQStats.from_array(np.sum(allgather_objects(self.to_array()), axis=0))


def pq_stats(pred: np.ndarray, pred_classes: Sequence[int], gt: np.ndarray,
             gt_classes: Sequence[int], gt_is_crowd: Sequence[bool],
             num_classes: int) -> PQStats:
  """`PQStats` of one image (module docstring). `pred` / `gt` (H, W) integer segment maps: 0
  void, i + 1 the i-th segment of `pred_classes` / `gt_classes` (contiguous class ids)."""
  pred, gt = np.asarray(pred, np.int64), np.asarray(gt, np.int64)
  if pred.shape != gt.shape:
    raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in size")
  pred_classes = np.asarray(pred_classes, np.int64).reshape(-1)
  gt_classes = np.asarray(gt_classes, np.int64).reshape(-1)
  gt_crowd = np.asarray(gt_is_crowd, bool).reshape(-1)
  n_pred, n_gt = len(pred_classes), len(gt_classes)
  if pred.max(initial=0) > n_pred or gt.max(initial=0) > n_gt or min(pred.min(initial=0),
                                                                     gt.min(initial=0)) < 0:
    raise ValueError("segment maps hold ids outside 0..number of segments")
  # (n_gt + 1, n_pred + 1) pixel counts; row / column 0: void.
  inter = np.bincount((gt * (n_pred + 1) + pred).ravel(),
                      minlength=(n_gt + 1) * (n_pred + 1)).reshape(n_gt + 1, n_pred + 1)
  gt_area, pred_area = inter[1:].sum(axis=1), inter[:, 1:].sum(axis=0)
  on_void = inter[0, 1:]
  overlap = inter[1:, 1:]
  with np.errstate(divide="ignore", invalid="ignore"):
    iou = overlap / (pred_area[None] + gt_area[:, None] - overlap - on_void[None])
  match = ((gt_classes[:, None] == pred_classes[None]) & ~gt_crowd[:, None] & (overlap > 0)
           & (iou > 0.5))
  s = PQStats.zeros(num_classes)
  g, p = np.nonzero(match)
  np.add.at(s.tp, gt_classes[g], 1)
  np.add.at(s.iou, gt_classes[g], iou[g, p])
  gt_matched, pred_matched = match.any(axis=1), match.any(axis=0)
  np.add.at(s.fn, gt_classes[~gt_matched & ~gt_crowd], 1)
  crowd_of = {int(gt_classes[i]): i for i in np.flatnonzero(gt_crowd)}  # the last one wins
  for j in np.flatnonzero(~pred_matched & (pred_area > 0)):
    ignored = on_void[j]
    c = int(pred_classes[j])
    if c in crowd_of:
      ignored += overlap[crowd_of[c], j]
    if ignored / pred_area[j] <= 0.5:
      s.fp[c] += 1
  return s


def pq_results(stats: PQStats, class_names: Sequence[str],
               is_thing_class: Sequence[bool]) -> dict[str, Any]:
  """PQ / SQ / RQ (percent) of All, Things (`_th`) and Stuff (`_st`), the number of classes
  each mean is over (`PQ_classes`), and per class {name, isthing, PQ, SQ, RQ, TP, FP, FN}."""
  tp, fp, fn, iou = stats.tp, stats.fp, stats.fn, stats.iou
  den = tp + 0.5 * fp + 0.5 * fn
  occurs = (tp + fp + fn) > 0
  with np.errstate(divide="ignore", invalid="ignore"):
    pq = np.where(occurs, iou / den, np.nan) * 100.0
    sq = np.where(occurs, np.where(tp > 0, iou / np.maximum(tp, 1), 0.0), np.nan) * 100.0
    rq = np.where(occurs, tp / den, np.nan) * 100.0
  thing = np.asarray(is_thing_class, bool)
  if len(thing) != len(tp) or len(class_names) != len(tp):
    raise ValueError(f"{len(class_names)} class names and {len(thing)} thing flags for "
                     f"{len(tp)} classes")
  out: dict[str, Any] = {}
  counts = {}
  for suffix, group in (("", np.ones_like(thing)), ("_th", thing), ("_st", ~thing)):
    for key, values in (("PQ", pq), ("SQ", sq), ("RQ", rq)):
      out[key + suffix] = metrics.nanmean(values[group])
    counts[{"": "all", "_th": "things", "_st": "stuff"}[suffix]] = int((occurs & group).sum())
  out["PQ_classes"] = counts
  out["per_class"] = [
      {"name": str(n), "isthing": bool(t), "PQ": float(a), "SQ": float(b), "RQ": float(c),
       "TP": int(x), "FP": int(y), "FN": int(z)}
      for n, t, a, b, c, x, y, z in zip(class_names, thing, pq, sq, rq, tp, fp, fn)]
  return out


# ----------------------------------------------------------------------------------------------
# Instance mask AP.


def encode_masks(masks: np.ndarray) -> list[dict]:
  """COCO RLEs ({"size": [H, W], "counts": str}) of (N, H, W) boolean masks."""
  from pycocotools import mask as mask_util  # pylint: disable=g-import-not-at-top
  masks = np.asarray(masks, bool)
  if not len(masks):
    return []
  rles = mask_util.encode(np.asfortranarray(np.moveaxis(masks, 0, -1).astype(np.uint8)))
  for r in rles:
    r["counts"] = r["counts"].decode("ascii")
  return rles


@dataclasses.dataclass
class InstanceAccumulator:
  """Ground truth and detections of the images this process evaluated, in COCO's result
  format: `images` [{id, height, width}], `ground_truth` [{image_id, category_id,
  segmentation, area, iscrowd}], `detections` [{image_id, category_id, segmentation, score}]
  (category ids: contiguous class ids)."""
  images: list = dataclasses.field(default_factory=list)
  ground_truth: list = dataclasses.field(default_factory=list)
  detections: list = dataclasses.field(default_factory=list)

  def add_image(self, image_id: int, gt_segments: np.ndarray, gt_classes: Sequence[int],
                gt_is_crowd: Sequence[bool], pred_masks: np.ndarray,
                pred_classes: Sequence[int], pred_scores: Sequence[float],
                classes: np.ndarray | None = None,
                gt_areas: Sequence[float] | None = None) -> None:
    """One image: ground truth as a segment map (H, W) (0 void, i + 1 = segment i) or a mask
    stack (N, H, W) bool (masks may overlap), with its classes, crowd flags and optionally
    areas (N,) (default: pixel counts); detections (T, H, W) bool with classes and scores.
    `classes` (C,) bool: the classes AP counts (e.g. the things of a panoptic dataset); None:
    all."""
    gt_segments = np.asarray(gt_segments)
    h, w = gt_segments.shape[-2:]
    self.images.append({"id": int(image_id), "height": int(h), "width": int(w)})
    gt_classes = np.asarray(gt_classes, np.int64).reshape(-1)
    if gt_segments.ndim == 3 and len(gt_segments) != len(gt_classes):
      raise ValueError(f"{len(gt_segments)} ground-truth masks and {len(gt_classes)} classes")
    keep_gt = [i for i, c in enumerate(gt_classes) if classes is None or classes[c]]
    if gt_segments.ndim == 3:
      gt_masks = gt_segments[keep_gt].astype(bool)
    else:
      gt_masks = np.stack([gt_segments == i + 1 for i in keep_gt]) if keep_gt else np.zeros(
          (0, h, w), bool)
    for i, rle, mask in zip(keep_gt, encode_masks(gt_masks), gt_masks):
      area = int(mask.sum()) if gt_areas is None else float(gt_areas[i])
      self.ground_truth.append({"image_id": int(image_id), "category_id": int(gt_classes[i]),
                                "segmentation": rle, "area": area,
                                "iscrowd": int(bool(gt_is_crowd[i]))})
    pred_classes = np.asarray(pred_classes, np.int64).reshape(-1)
    keep = [i for i, c in enumerate(pred_classes) if classes is None or classes[c]]
    pred_masks = np.asarray(pred_masks)[keep] if keep else np.zeros((0, h, w), bool)
    for i, rle in zip(keep, encode_masks(pred_masks)):
      self.detections.append({"image_id": int(image_id), "category_id": int(pred_classes[i]),
                              "segmentation": rle, "score": float(pred_scores[i])})

  def gathered(self) -> "InstanceAccumulator":
    """The union over all processes (every process must call this; all receive it)."""
    if jax.process_count() == 1:
      return self
    out = InstanceAccumulator()
    for part in allgather_objects((self.images, self.ground_truth, self.detections)):
      out.images += part[0]
      out.ground_truth += part[1]
      out.detections += part[2]
    return out


def allgather_objects(obj: Any) -> list[Any]:
  """[obj of process 0, obj of process 1, ...] on every process (pickled, padded to the
  longest, `process_allgather` of the bytes: exact whatever the dtypes); every process must
  call this."""
  if jax.process_count() == 1:
    return [obj]
  data = np.frombuffer(pickle.dumps(obj), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int64(data.size))).reshape(-1)
  buf = np.zeros(int(sizes.max()), np.uint8)
  buf[:data.size] = data
  parts = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
  return [pickle.loads(parts[i, :sizes[i]].tobytes()) for i in range(len(sizes))]


def _stat(x: float) -> float:
  """COCOeval's -1 (nothing to evaluate) -> NaN; else percent."""
  return float("nan") if x < 0 else float(x) * 100.0


def mask_ap(acc: InstanceAccumulator, class_names: Sequence[str],
            classes: np.ndarray | None = None) -> dict[str, Any]:
  """COCO mask AP of the accumulated images (module docstring): `metrics.AP_KEYS` in percent
  (NaN where COCOeval has nothing to evaluate) and `per_class` [{name, AP}] over `classes` (C,)
  bool (None: all). Logs COCOeval's summary."""
  try:
    from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
    from pycocotools.cocoeval import COCOeval  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("instance mask AP needs pycocotools (pip install pycocotools), or set "
                      "config.eval.instance_ap=False") from e
  ids = [i for i in range(len(class_names)) if classes is None or classes[i]]
  categories = [{"id": i, "name": str(class_names[i])} for i in ids]
  gt = COCO()
  gt.dataset = {"images": list(acc.images), "categories": categories,
                "annotations": [{**a, "id": n + 1} for n, a in enumerate(acc.ground_truth)]}
  with contextlib.redirect_stdout(io.StringIO()):
    gt.createIndex()
    if acc.detections:
      dt = gt.loadRes([dict(d) for d in acc.detections])
    else:  # loadRes cannot take an empty list; no detections score 0 where there is truth
      dt = COCO()
      dt.dataset = {"images": list(acc.images), "categories": categories, "annotations": []}
      dt.createIndex()
    coco_eval = COCOeval(gt, dt, iouType="segm")
    coco_eval.evaluate()
    coco_eval.accumulate()
  text = io.StringIO()
  with contextlib.redirect_stdout(text):
    coco_eval.summarize()
  logging.info("COCOeval segm:\n%s", text.getvalue())
  out = {key: _stat(v) for key, v in zip(metrics.AP_KEYS, coco_eval.stats[:6])}
  precision = coco_eval.eval["precision"]  # (T, R, K, A, M); K in catIds order (sorted ids)
  per_class = {}
  for j, cat in enumerate(coco_eval.params.catIds):
    p = precision[:, :, j, 0, -1]
    per_class[cat] = float(p[p > -1].mean() * 100.0) if (p > -1).any() else float("nan")
  out["per_class"] = [{"name": str(class_names[i]), "AP": per_class.get(i, float("nan"))}
                      for i in ids]
  return out


def ap_allprocesses(acc: InstanceAccumulator, class_names: Sequence[str],
                    classes: np.ndarray | None = None) -> dict[str, Any]:
  """`mask_ap` of every process's images: gathered, evaluated on process 0, the numbers
  broadcast (every process must call this and gets the same dict)."""
  acc = acc.gathered()
  if jax.process_count() == 1:
    return mask_ap(acc, class_names, classes)
  result = mask_ap(acc, class_names, classes) if jax.process_index() == 0 else None
  return allgather_objects(result)[0]
