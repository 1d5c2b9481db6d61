"""The iteration both evaluation loops (`semantic`, `panoptic`) share: records read and
test-resized in order by threads ahead of the device, a progress bar, device results fetched a
few records late (so the host never waits for the device it has just fed), the image count
summed over processes with this process's images/s, and `eval_results.json`.

  def step(records):            # a group of `batch` records -> one device result per record
    ...; yield result           # dispatched, not waited for
  def consume(index, record, result):   # host work on the fetched result, in record order
    ...
  speed = run(dataset, step, consume, num_threads=4, progress=True)
  results.update(speed)         # {"images": all processes, "images_per_s": this process's}
  write_results(results, out_dir)
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grain
import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from segvit_jax.evaluation import metrics

# Device results wait this many records before the host fetches them: no stalls.
LAG = 2
RESULTS_FILE = "eval_results.json"


def iterate(dataset: grain.MapDataset, num_threads: int) -> Iterator[Any]:
  """Records in order, read and resized by `num_threads` threads ahead of the device."""
  if num_threads <= 0:
    return iter(dataset)
  return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                        prefetch_buffer_size=2 * num_threads)))


def groups(iterator: Iterable[Any], size: int) -> Iterator[list[Any]]:
  """Lists of up to `size` consecutive elements."""
  group = []
  for element in iterator:
    group.append(element)
    if len(group) == size:
      yield group
      group = []
  if group:
    yield group


class Progress:
  """A tqdm bar with rate and ETA on process 0 (`bar`), else a log line every `every` images."""

  def __init__(self, total: int, bar: bool, every: int = 50):
    self.total, self.every, self.t0, self.done = total, every, time.perf_counter(), 0
    self.bar = None
    if bar and jax.process_index() == 0:
      import tqdm  # pylint: disable=g-import-not-at-top  (optional: only with a bar)
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


def sum_over_processes(x: np.ndarray) -> np.ndarray:
  """`x` summed over all processes (every process must call this); `x` itself with one."""
  if jax.process_count() == 1:
    return x
  return np.asarray(multihost_utils.process_allgather(x)).sum(axis=0)


def run(dataset: grain.MapDataset, step: Callable[[list], Iterable[Any]],
        consume: Callable[[int, Any, Any], None], *, num_threads: int, progress: bool,
        batch: int = 1) -> dict[str, float]:
  """Evaluates this process's shard: `step(records)` on groups of `batch` consecutive records
  yields one device result per record; `consume(index, record, result)` receives them in
  record order, `LAG` records late. Every process must call this (the image count is summed
  over processes). Returns {"images": over all processes, "images_per_s": that count over
  this process's seconds}."""
  pending = collections.deque()
  bar = Progress(len(dataset), progress)
  index = 0
  for group in groups(iterate(dataset, num_threads), batch):
    for record, result in zip(group, step(group), strict=True):
      pending.append((index, record, result))
      index += 1
      if len(pending) > LAG:
        consume(*pending.popleft())
      bar.update()
  while pending:
    consume(*pending.popleft())
  seconds = bar.close()
  num_images = int(sum_over_processes(np.int64(len(dataset))))
  return {"images": num_images,
          "images_per_s": num_images / seconds if seconds > 0 else float("nan")}


def picture_dir(out_dir: str | None, num_pictures: int) -> str | None:
  """OUT_DIR/pictures (made by process 0) when pictures are asked for and there is an
  `out_dir`, else None."""
  if not (out_dir and num_pictures):
    return None
  path = os.path.join(out_dir, "pictures")
  if jax.process_index() == 0:
    os.makedirs(path, exist_ok=True)
  return path


def write_results(results: dict[str, Any], out_dir: str | None) -> None:
  """OUT_DIR/eval_results.json (`metrics.to_json`), from process 0, if there is an out_dir."""
  if out_dir and jax.process_index() == 0:
    metrics.to_json(results, os.path.join(out_dir, RESULTS_FILE))
