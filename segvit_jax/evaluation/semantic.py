"""Semantic evaluation at the papers' protocols: test resize policy, whole / slide / spread
windows, multi-scale and flip (`inference.MultiScalePredictor`), mIoU / mAcc / aAcc and
per-class IoU / Acc from a confusion matrix computed on device and summed across processes
(`metrics`), results in `eval_results.json` (with the protocol used), side-by-side pictures and
a confusion-matrix picture (`pictures`). The read-ahead, progress and late-fetch loop is
`loop.run`; `segvit_jax.evaluation.evaluate` dispatches here for `config.eval.task` "semantic".

The protocol is `config.eval` (every key defaults in configs/common.py `run_config`):
  resize, scale, size_divisor  test resize (`transforms.test_size`): "keep_ratio" to (long,
                               short) (SegViT / mmseg), "keep_ratio_aligned" (SegFormer ADE20K),
                               "short_side" to the crop (EoMT), "none"
  min_size                     mmseg's Resize(min_size): short side >= it, long side uncapped
  scales, flip                 multi-scale ratios, e.g. (0.5, 0.75, 1.0, 1.25, 1.5, 1.75), and
                               horizontal flip
  mode, crop_size, stride      "slide" (mmseg), "spread" (EoMT), "whole"
  average                      "softmax" (mmseg) or "scores" (mask classification) across views
  background_free_metrics      also report mIoU without class 0 (PASCAL-Context mIoU59 from a
                               60-class model; None: on for pascal_context with 60 classes)
  window_batch, bucket, num_threads, max_examples   speed and size knobs

Every process evaluates its shard of the split on its own devices (parameters replicated on
them), so images of any size need no cross-process agreement on shapes.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from segvit_jax.data import palettes, pipeline
from segvit_jax.evaluation import inference, loop, metrics, pictures


def protocol_record(config: ml_collections.ConfigDict, split: str) -> dict[str, Any]:
  """What eval_results.json says about how the numbers were obtained."""
  ev = config.eval
  return {
      "dataset": config.dataset.name, "split": split,
      "resize": ev.resize if tuple(ev.scale) else "none",
      "scale": list(ev.scale), "min_size": int(ev.min_size),
      "scales": [float(r) for r in ev.scales],
      "flip": bool(ev.flip), "mode": ev.mode, "crop_size": list(ev.crop_size),
      "stride": list(ev.stride), "average": ev.average,
      "reduce_zero_label": bool(config.dataset.reduce_zero_label),
  }


def background_free(config: ml_collections.ConfigDict) -> bool:
  """Whether to also report metrics without class 0 (PASCAL-Context: mIoU59 next to mIoU60)."""
  flag = config.eval.background_free_metrics
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


def evaluate(model, variables: Any, config: ml_collections.ConfigDict, *, split: str,
             out_dir: str | None = None, num_pictures: int = 0, progress: bool = False,
             evaluated: dict[str, Any] | None = None) -> dict[str, Any]:
  """Evaluates the model's `variables` ({"params": ..., other collections}) on `split` with
  the protocol of `config.eval`; every process takes a shard, the confusion matrices are
  summed across processes (all processes must call this). Writes `eval_results.json`, and
  with `num_pictures` the first pictures and `confusion.png`, to `out_dir` if given."""
  dataset, class_names = pipeline.make_eval_dataset(config, split)
  k = config.model.num_classes
  if len(class_names) != k:
    raise ValueError(f"dataset has {len(class_names)} classes, model.num_classes={k}")
  ignore = int(config.dataset.ignore_index)
  predictor = make_predictor(model, variables, config)
  without0 = background_free(config)
  pic_dir = loop.picture_dir(out_dir, num_pictures)
  colours = palettes.palette_for_class_names(class_names)
  conf = np.zeros((2 if without0 else 1, k, k), np.int64)

  def step(records: list[dict]):
    for ex in records:
      yield score_image(predictor, ex, ignore_index=ignore, without_class0=without0)

  def consume(index: int, ex: dict, result: tuple[jax.Array, jax.Array]) -> None:
    pred, mats = result
    conf[...] += np.asarray(mats, np.int64)
    if pic_dir and index < num_pictures and jax.process_index() == 0:
      label = ex["label"]
      h, w = label.shape
      pictures.save(os.path.join(pic_dir, f"{ex['name']}.jpg"),
                    pictures.panel(ex["image"], label, np.asarray(pred)[:h, :w], colours,
                                   class_names))

  speed = loop.run(dataset, step, consume, num_threads=int(config.eval.num_threads),
                   progress=progress)
  conf = loop.sum_over_processes(conf)

  results = metrics.segmentation_metrics(conf[0], class_names)
  if without0:
    results["without_class0"] = metrics.segmentation_metrics(conf[1][1:, 1:], class_names[1:])
    results[f"mIoU{k}"] = results["mIoU"]
    results[f"mIoU{k - 1}"] = results["without_class0"]["mIoU"]
  results["protocol"] = protocol_record(config, split)
  results.update(speed)
  if evaluated:
    results["evaluated"] = evaluated
  loop.write_results(results, out_dir)
  if out_dir and num_pictures and jax.process_index() == 0:
    pictures.save(os.path.join(out_dir, "confusion.png"),
                  pictures.confusion_picture(conf[0], class_names))
  return results
