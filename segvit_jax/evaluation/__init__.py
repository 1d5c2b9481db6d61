"""Evaluation at the papers' test protocols, one entry point for every task:

  results = evaluate(model, variables, config, out_dir=..., num_pictures=8)
  print(metrics.format_table(results))

`config.eval.task` picks the loop: "semantic" (mIoU / mAcc / aAcc, `semantic`), "panoptic" or
"instance" (PQ / SQ / RQ and COCO mask AP of a mask-classification model, `panoptic`). The
modules:

  inference   window layouts, whole / slide / spread scores, the multi-scale + flip predictor
              and the whole-image mask predictor
  semantic    the semantic evaluation loop
  panoptic    panoptic / instance post-processing and their evaluation loop
  loop        the iteration both loops share (read-ahead threads, progress, late fetch)
  metrics     mIoU / mAcc / aAcc from confusion matrices, results JSON, the one results table
  pq          PQ / SQ / RQ and COCO mask AP accumulation
  pictures    prediction overlays, side-by-side panels, the confusion-matrix picture
"""

from __future__ import annotations

from typing import Any

import ml_collections

from segvit_jax.evaluation import inference, loop, metrics, panoptic, pictures, pq, semantic

__all__ = ["TASKS", "evaluate", "inference", "loop", "metrics", "panoptic", "pictures", "pq",
           "semantic"]

# config.eval.task -> its evaluation loop.
TASKS = {"semantic": semantic.evaluate, "panoptic": panoptic.evaluate,
         "instance": panoptic.evaluate}


def evaluate(model, variables: Any, config: ml_collections.ConfigDict, *,
             split: str | None = None, out_dir: str | None = None, num_pictures: int = 0,
             progress: bool = False, evaluated: dict[str, Any] | None = None
             ) -> dict[str, Any]:
  """Evaluates the model's `variables` ({"params": ..., other collections}) on `split`
  (default config.dataset.eval_split) with the protocol of `config.eval`, for the task
  `config.eval.task`. Every process takes a shard and the numbers are combined across
  processes (all processes must call this). Writes `eval_results.json` to `out_dir` if given,
  with `num_pictures` the first side-by-side pictures (and, semantic, `confusion.png`);
  `progress` shows a bar on process 0; `evaluated` (what was evaluated: checkpoint, step,
  config) is recorded in the results. The protocol is checked before anything is read."""
  task = config.eval.task
  if task not in TASKS:
    raise ValueError(f"config.eval.task={task!r}: expected one of {tuple(TASKS)}")
  inference.check_protocol(config.eval)
  split = config.dataset.eval_split if split is None else split
  return TASKS[task](model, variables, config, split=split, out_dir=out_dir,
                     num_pictures=num_pictures, progress=progress, evaluated=evaluated)
