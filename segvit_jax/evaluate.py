"""Single-scale evaluation: whole-image or sliding-window inference over a split, mIoU / mAcc /
aAcc / per-class IoU from a confusion matrix accumulated on device (ignore index excluded),
results as a table and as `eval_results.json`, and overlay pictures of the first examples.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from segvit_jax import inference, metrics, visualize
from segvit_jax.data import datasets, pipeline
from segvit_jax.models import patch_size


def make_predict_fn(model, config: ml_collections.ConfigDict) -> Callable:
  """jitted (params, image (1, h, w, 3), out_size) -> predicted class ids (1, H, W) int32
  and scores (1, C, H, W); compiled once per (image shape, out_size)."""
  ev = config.eval

  @functools.partial(jax.jit, static_argnums=(2,))
  def predict(params, image, out_size):
    score_fn = lambda x: model.apply({"params": params}, x)["semantic_scores"]  # noqa: E731
    scores = inference.predict_scores(
        score_fn, image, mode=ev.mode, crop=tuple(ev.crop_size), stride=tuple(ev.stride),
        num_classes=config.model.num_classes, out_size=out_size,
        size_divisor=patch_size(config.model), batch_size=ev.get("window_batch", None))
    return jnp.argmax(scores, axis=1).astype(jnp.int32), scores

  return predict


def denormalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  return np.clip(image * np.asarray(std) + np.asarray(mean) + 0.5, 0, 255).astype(np.uint8)


def evaluate_params(model, params: Any, config: ml_collections.ConfigDict, *,
                    split: str | None = None, out_dir: str | None = None,
                    num_pictures: int = 0, progress: bool = False) -> dict[str, Any]:
  """Evaluates `params` on `split`; every process takes a shard, the confusion matrices are
  summed across processes. Writes `eval_results.json` (and pictures) to `out_dir` if given."""
  dataset, class_names = pipeline.make_eval_dataset(config, split)
  k = config.model.num_classes
  if len(class_names) != k:
    raise ValueError(f"dataset has {len(class_names)} classes, model.num_classes={k}")
  predict = make_predict_fn(model, config)
  conf_fn = jax.jit(functools.partial(metrics.confusion_matrix, num_classes=k,
                                      ignore_index=config.dataset.ignore_index))
  conf = np.zeros((k, k), np.int64)
  pic_dir = os.path.join(out_dir, "pictures") if out_dir and num_pictures else None
  colours = datasets.palette_for(config.dataset.name, k)
  if pic_dir:
    os.makedirs(pic_dir, exist_ok=True)
  n, t0 = len(dataset), time.perf_counter()
  for i in range(n):
    ex = dataset[i]
    label = np.asarray(ex["label"])
    pred, _ = predict(params, jnp.asarray(ex["image"])[None], tuple(label.shape))
    conf += np.asarray(conf_fn(pred[0], jnp.asarray(label)), np.int64)
    if pic_dir and i < num_pictures and jax.process_index() == 0:
      img = visualize.resize_to(denormalize(np.asarray(ex["image"]), config.mean, config.std),
                                label.shape)
      visualize.save(os.path.join(pic_dir, f"{ex['name']}.jpg"),
                     visualize.panel(img, label, np.asarray(pred[0]), k, colours))
    if progress and jax.process_index() == 0 and ((i + 1) % 20 == 0 or i + 1 == n):
      rate = (i + 1) / (time.perf_counter() - t0)
      logging.info("eval %d/%d images | %.1f img/s | ETA %.0fs", i + 1, n, rate,
                   (n - i - 1) / rate)
  if jax.process_count() > 1:
    conf = np.asarray(multihost_utils.process_allgather(conf)).sum(axis=0)
  results = metrics.segmentation_metrics(conf, class_names)
  if out_dir and jax.process_index() == 0:
    metrics.to_json(results, os.path.join(out_dir, "eval_results.json"))
  return results
