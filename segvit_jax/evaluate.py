"""Evaluation at the papers' protocols: test resize policy, whole / slide / spread windows,
multi-scale and flip (`segvit_jax.inference.MultiScalePredictor`), mIoU / mAcc / aAcc and per-class
IoU / Acc from a confusion matrix computed on device and summed across processes, results as a
table and as `eval_results.json` (with the protocol used), side-by-side pictures and a
confusion-matrix picture.

`config.eval.task` "panoptic" or "instance" evaluates a mask-classification model (EoMT) at the
panoptic / instance protocol instead (`evaluate_mask_classification`, spec eomt.md
"Inference"): the longer side resized to the input (`resize` "long_side", `scale` the input
size), padded to the square input, one model call per image (`inference.MaskPredictor`,
`window_batch` images per call), the panoptic / instance post-processing of
`segvit_jax.panoptic` (`object_mask_threshold`, `overlap_threshold`, `top_k`), PQ / SQ / RQ
(All, Things, Stuff, per class; summed across processes) and, for "instance" or with
`instance_ap` (default on), COCO mask AP over the thing classes (gathered to process 0)
(`segvit_jax.panoptic_metrics`).

The semantic protocol is `config.eval`:
  resize, scale, size_divisor  test resize (`transforms.test_size`): "keep_ratio" to (long,
                               short) (SegViT / mmseg), "keep_ratio_aligned" (SegFormer ADE20K),
                               "short_side" to the crop (EoMT), "none"
  min_size                     mmseg's Resize(min_size): short side >= it, long side uncapped
  scales, flip                 multi-scale ratios, e.g. (0.5, 0.75, 1.0, 1.25, 1.5, 1.75), and
                               horizontal flip
  mode, crop_size, stride      "slide" (mmseg), "spread" (EoMT), "whole"
  average                      "softmax" (mmseg) or "scores" (mask classification) across views
  background_free_metrics      also report mIoU without class 0 (PASCAL-Context mIoU59 from a
                               60-class model; on by default for pascal_context)
  window_batch, bucket, num_threads, max_examples   speed and size knobs

Every process evaluates its shard of the split on its own devices (parameters replicated on
them), so images of any size need no cross-process agreement on shapes.
"""

from __future__ import annotations

import collections
import functools
import os
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from segvit_jax import inference, metrics, panoptic, panoptic_metrics, visualize
from segvit_jax.data import palettes, pipeline


def protocol_record(config: ml_collections.ConfigDict, split: str) -> dict[str, Any]:
  """What eval_results.json says about how the numbers were obtained."""
  ev = config.eval
  return {
      "dataset": config.dataset.name, "split": split,
      "resize": ev.get("resize", "keep_ratio") if tuple(ev.scale) else "none",
      "scale": list(ev.scale), "min_size": int(ev.get("min_size", 0)),
      "scales": [float(r) for r in ev.get("scales", (1.0,))],
      "flip": bool(ev.get("flip", False)), "mode": ev.mode, "crop_size": list(ev.crop_size),
      "stride": list(ev.stride), "average": ev.get("average", "softmax"),
      "reduce_zero_label": bool(config.dataset.get("reduce_zero_label", False)),
  }


def background_free(config: ml_collections.ConfigDict) -> bool:
  """Whether to also report metrics without class 0 (PASCAL-Context: mIoU59 next to mIoU60)."""
  flag = config.eval.get("background_free_metrics", None)
  if flag is None:
    return config.dataset.name == "pascal_context" and config.model.num_classes == 60
  return bool(flag)


@functools.partial(jax.jit, static_argnames=("num_classes", "ignore_index", "without_class0"))
def confusions(total: jax.Array, label: jax.Array, *, num_classes: int, ignore_index: int,
               without_class0: bool = False) -> tuple[jax.Array, jax.Array]:
  """(prediction (Hb, Wb) int32, confusion matrices (V, K, K) int32) of summed view scores
  (Hb, Wb, K) against a label buffer (Hb, Wb) padded with `ignore_index`.

  With `without_class0`, a second matrix scores the image as a model without class 0 would
  be: class 0 is never predicted (argmax over classes 1..K-1) and pixels labelled 0 are
  ignored; its [1:, 1:] block gives e.g. PASCAL-Context's mIoU59 from a 60-class model.
  """
  pred = jnp.argmax(total, axis=-1).astype(jnp.int32)
  mats = [metrics.confusion_matrix(pred, label, num_classes, ignore_index)]
  if without_class0:
    pred0 = jnp.argmax(total[..., 1:], axis=-1).astype(jnp.int32) + 1
    label0 = jnp.where(label == 0, ignore_index, label)
    mats.append(metrics.confusion_matrix(pred0, label0, num_classes, ignore_index))
  return pred, jnp.stack(mats)


def make_predictor(model, variables: Any, config: ml_collections.ConfigDict
                   ) -> inference.MultiScalePredictor:
  """The model's semantic scores under `config.eval`'s protocol, on this process's devices.
  `variables`: {"params": ...} and any other collections (BatchNorm's batch_stats)."""
  apply_fn = lambda v, x: model.apply(v, x)["semantic_scores"]  # noqa: E731
  return inference.MultiScalePredictor(apply_fn, variables,
                                       inference.Protocol.from_config(config),
                                       config.model.num_classes, mean=config.mean,
                                       std=config.std)


def score_image(predictor: inference.MultiScalePredictor, record: dict[str, Any], *,
                ignore_index: int, without_class0: bool = False
                ) -> tuple[jax.Array, jax.Array]:
  """`confusions` of one evaluation record (`MultiScaleResize`), on the devices (not waited
  for): (prediction (Hb, Wb), confusion matrices (V, K, K))."""
  label = record["label"]
  total = predictor(record["images"], label.shape)
  buf = np.full(total.shape[:2], ignore_index, np.int32)
  buf[:label.shape[0], :label.shape[1]] = label
  with predictor.activate():
    return confusions(total, predictor.put(buf), num_classes=predictor.num_classes,
                      ignore_index=ignore_index, without_class0=without_class0)


def _iterate(dataset: grain.MapDataset, num_threads: int):
  """Records in order, read and resized by `num_threads` threads ahead of the device."""
  if num_threads <= 0:
    return iter(dataset)
  return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                        prefetch_buffer_size=2 * num_threads)))


class _Progress:
  """A tqdm bar with rate and ETA on process 0 (`bar`), else a log line every `every` images."""

  def __init__(self, total: int, bar: bool, every: int = 50):
    self.total, self.every, self.t0, self.done = total, every, time.perf_counter(), 0
    self.bar = None
    if bar and jax.process_index() == 0:
      import tqdm  # pylint: disable=g-import-not-at-top
      self.bar = tqdm.tqdm(total=total, desc="eval", unit="img", dynamic_ncols=True)

  def update(self) -> None:
    self.done += 1
    if self.bar is not None:
      self.bar.update(1)
    elif jax.process_index() == 0 and (self.done % self.every == 0 or self.done == self.total):
      rate = self.done / (time.perf_counter() - self.t0)
      logging.info("eval %d/%d images | %.2f img/s | ETA %.0fs", self.done, self.total, rate,
                   (self.total - self.done) / rate)

  def close(self) -> float:
    if self.bar is not None:
      self.bar.close()
    return time.perf_counter() - self.t0


def evaluate_params(model, variables: Any, config: ml_collections.ConfigDict, *,
                    split: str | None = None, out_dir: str | None = None,
                    num_pictures: int = 0, progress: bool = False) -> dict[str, Any]:
  """Evaluates the model's `variables` ({"params": ..., other collections}) on `split`
  (default config.dataset.eval_split) with the protocol of `config.eval`; every process takes a shard, the confusion matrices are summed across
  processes (all processes must call this). Writes `eval_results.json`, and with
  `num_pictures` the first pictures and `confusion.png`, to `out_dir` if given."""
  split = config.dataset.eval_split if split is None else split
  task = config.eval.get("task", "semantic")
  if task not in panoptic.TASKS:
    raise ValueError(f"config.eval.task={task!r}: expected one of {panoptic.TASKS}")
  if task != "semantic":
    return evaluate_mask_classification(model, variables, config, split=split, out_dir=out_dir,
                                        num_pictures=num_pictures, progress=progress)
  dataset, class_names = pipeline.make_eval_dataset(config, split)
  k = config.model.num_classes
  if len(class_names) != k:
    raise ValueError(f"dataset has {len(class_names)} classes, model.num_classes={k}")
  ignore = int(config.dataset.ignore_index)
  predictor = make_predictor(model, variables, config)
  without0 = background_free(config)
  pic_dir = os.path.join(out_dir, "pictures") if out_dir and num_pictures else None
  if pic_dir and jax.process_index() == 0:
    os.makedirs(pic_dir, exist_ok=True)
  colours = palettes.palette_for(config.dataset.name, k)

  conf = np.zeros((2 if without0 else 1, k, k), np.int64)
  pending = collections.deque()  # device matrices fetched a few images late: no stalls
  bar = _Progress(len(dataset), progress)
  for i, ex in enumerate(_iterate(dataset, int(config.eval.get("num_threads", 4)))):
    label = ex["label"]
    pred, mats = score_image(predictor, ex, ignore_index=ignore, without_class0=without0)
    pending.append(mats)
    if len(pending) > 2:
      conf += np.asarray(pending.popleft(), np.int64)
    if pic_dir and i < num_pictures and jax.process_index() == 0:
      h, w = label.shape
      visualize.save(os.path.join(pic_dir, f"{ex['name']}.jpg"),
                     visualize.panel(ex["image"], label, np.asarray(pred)[:h, :w], k, colours))
    bar.update()
  while pending:
    conf += np.asarray(pending.popleft(), np.int64)
  seconds = bar.close()
  num_images = len(dataset)
  if jax.process_count() > 1:
    conf = np.asarray(multihost_utils.process_allgather(conf)).sum(axis=0)
    num_images = int(np.asarray(multihost_utils.process_allgather(np.int64(num_images))).sum())

  results = metrics.segmentation_metrics(conf[0], class_names)
  if without0:
    results["without_class0"] = metrics.segmentation_metrics(conf[1][1:, 1:], class_names[1:])
    results[f"mIoU{k}"] = results["mIoU"]
    results[f"mIoU{k - 1}"] = results["without_class0"]["mIoU"]
  results["protocol"] = protocol_record(config, split)
  results["images"] = num_images
  results["images_per_s"] = num_images / seconds if seconds > 0 else float("nan")
  if out_dir and jax.process_index() == 0:
    metrics.to_json(results, os.path.join(out_dir, "eval_results.json"))
    if num_pictures:
      visualize.save(os.path.join(out_dir, "confusion.png"),
                     visualize.confusion_picture(conf[0], class_names))
  return results


# ----------------------------------------------------------------------------------------------
# Panoptic / instance evaluation of mask-classification models.


def mask_protocol_record(config: ml_collections.ConfigDict, split: str) -> dict[str, Any]:
  """What eval_results.json says about how panoptic / instance numbers were obtained."""
  ev, post = config.eval, panoptic.PostProcessing.from_config(config)
  record = {
      "dataset": config.dataset.name, "split": split, "task": post.task,
      "resize": ev.get("resize", "long_side"), "scale": list(ev.scale),
      "pad": "bottom/right to the scale, black", "scales": [1.0], "flip": False,
      "object_mask_threshold": post.object_mask_threshold,
      "overlap_threshold": post.overlap_threshold, "top_k": post.top_k,
  }
  if post.task == "panoptic":
    record["pq"] = ("COCO panopticapi: same-class IoU > 0.5 matches, predicted pixels on void "
                    "left out of the union, crowd never matched nor missed, unmatched "
                    "predictions more than half on void or same-class crowd ignored")
  if post.computes_ap:
    record["ap"] = ("pycocotools COCOeval segm, at most top_k detections per image, thing "
                    "classes, crowd ground truth as iscrowd")
  return record


def make_mask_predictor(model, variables: Any, config: ml_collections.ConfigDict
                        ) -> inference.MaskPredictor:
  """The model's class and mask logits under `config.eval`'s panoptic / instance protocol, on
  this process's devices (the input is `config.eval.scale`)."""
  ev = config.eval
  if len(tuple(ev.scale)) != 2:
    raise ValueError(f"config.eval.scale={tuple(ev.scale)}: the panoptic / instance protocol "
                     "needs the (h, w) model input, e.g. (640, 640)")
  if tuple(float(r) for r in ev.get("scales", (1.0,))) != (1.0,) or ev.get("flip", False):
    raise ValueError("the panoptic / instance protocol is single-scale without flip: set "
                     "config.eval.scales=(1.0,) and config.eval.flip=False")

  def apply_fn(v, x):
    out = model.apply(v, x)
    return out["class_logits"], out["mask_logits"]

  return inference.MaskPredictor(apply_fn, variables, tuple(ev.scale), mean=config.mean,
                                 std=config.std, batch=int(ev.get("window_batch", None) or 1),
                                 bucket=int(ev.get("bucket", 64)))


def _groups(iterator, size: int):
  """Lists of up to `size` consecutive elements."""
  group = []
  for element in iterator:
    group.append(element)
    if len(group) == size:
      yield group
      group = []
  if group:
    yield group


def evaluate_mask_classification(model, variables: Any, config: ml_collections.ConfigDict, *,
                                 split: str | None = None, out_dir: str | None = None,
                                 num_pictures: int = 0, progress: bool = False
                                 ) -> dict[str, Any]:
  """Panoptic (PQ, SQ, RQ; with `instance_ap` also mask AP) or instance (mask AP) evaluation
  of a mask-classification model's `variables` on `split` under `config.eval` (module
  docstring). Every process takes a shard; all must call this. Writes `eval_results.json`,
  and with `num_pictures` the first [image | ground truth | prediction] pictures, to `out_dir`
  if given."""
  split = config.dataset.eval_split if split is None else split
  post = panoptic.PostProcessing.from_config(config)
  dataset, categories = pipeline.make_panoptic_eval_dataset(config, split)
  names, k = categories.names, config.model.num_classes
  if len(names) != k:
    raise ValueError(f"dataset has {len(names)} classes, model.num_classes={k}")
  is_thing = np.asarray(categories.is_thing, bool)
  # AP counts thing classes (a panoptic model's instance AP, Mask2Former's panoptic_on rule).
  ap_classes = is_thing if is_thing.any() else None
  predictor = make_mask_predictor(model, variables, config)
  pic_dir = os.path.join(out_dir, "pictures") if out_dir and num_pictures else None
  if pic_dir and jax.process_index() == 0:
    os.makedirs(pic_dir, exist_ok=True)
  colours = palettes.palette_for(config.dataset.name, k)

  stats = panoptic_metrics.PQStats.zeros(k)
  instances = panoptic_metrics.InstanceAccumulator()
  done = [0]

  def consume(ex: dict, outputs: dict) -> None:
    outputs = jax.device_get(outputs)
    gt = ex["segments"]
    if post.task == "panoptic":
      maps = outputs["panoptic"]
      lookup, segments = panoptic.panoptic_segments(maps, is_thing, post.overlap_threshold)
      pred = panoptic.segment_map(maps, lookup, gt.shape)
      pred_classes = [s["class_id"] for s in segments]
      stats.add(panoptic_metrics.pq_stats(pred, pred_classes, gt, ex["segment_classes"],
                                          ex["segment_is_crowd"], k))
      if pic_dir and done[0] < num_pictures and jax.process_index() == 0:
        image, gap = ex["image"], np.full((gt.shape[0], 4, 3), 255, np.uint8)
        visualize.save(os.path.join(pic_dir, f"{ex['name']}.jpg"), np.concatenate([
            image, gap,
            panoptic.overlay(image, gt, ex["segment_classes"], is_thing, colours), gap,
            panoptic.overlay(image, pred, pred_classes, is_thing, colours)], axis=1))
    if post.computes_ap:
      inst = outputs["instance"]
      h, w = gt.shape
      masks = np.moveaxis(inst["masks"][:h, :w], -1, 0)
      instances.add_image(ex["image_id"], gt, ex["segment_classes"], ex["segment_is_crowd"],
                          masks, inst["labels"], inst["scores"], ap_classes)
    done[0] += 1

  pending = collections.deque()  # device outputs fetched a few images late: no stalls
  bar = _Progress(len(dataset), progress)
  threads = int(config.eval.get("num_threads", 4))
  for group in _groups(_iterate(dataset, threads), predictor.batch):
    images = [ex["images"][0] for ex in group]
    class_logits, mask_logits = predictor.logits(images)
    for j, ex in enumerate(group):
      size = ex["segments"].shape
      masks = predictor.at_size(mask_logits[j], images[j].shape[:2], size)
      with predictor.activate():
        size = jnp.asarray(size, jnp.int32)
        outputs = {}
        if post.task == "panoptic":
          outputs["panoptic"] = panoptic.panoptic_maps(class_logits[j], masks, size,
                                                       post.object_mask_threshold)
        if post.computes_ap:
          outputs["instance"] = panoptic.instance_predictions(class_logits[j], masks, size,
                                                              top_k=post.top_k)
      pending.append((ex, outputs))
      if len(pending) > 2:
        consume(*pending.popleft())
      bar.update()
  while pending:
    consume(*pending.popleft())
  seconds = bar.close()
  num_images = len(dataset)
  if jax.process_count() > 1:
    num_images = int(np.asarray(multihost_utils.process_allgather(np.int64(num_images))).sum())

  results: dict[str, Any] = {}
  per_class = [{"name": n, "isthing": bool(t)} for n, t in zip(names, is_thing)]
  if post.task == "panoptic":
    pq = panoptic_metrics.pq_results(stats.allreduce(), names, is_thing)
    for row, pq_row in zip(per_class, pq.pop("per_class")):
      row.update(pq_row)
    results.update(pq)
  if post.computes_ap:
    ap = panoptic_metrics.ap_allprocesses(instances, names, ap_classes)
    by_name = {r["name"]: r["AP"] for r in ap.pop("per_class")}
    for row in per_class:
      if row["name"] in by_name:
        row["AP"] = by_name[row["name"]]
    results.update(ap)
  results["per_class"] = per_class
  results["protocol"] = mask_protocol_record(config, split)
  results["images"] = num_images
  results["images_per_s"] = num_images / seconds if seconds > 0 else float("nan")
  if out_dir and jax.process_index() == 0:
    metrics.to_json(results, os.path.join(out_dir, "eval_results.json"))
  return results

