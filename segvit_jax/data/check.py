"""Checks a configured dataset before training: every example decodes and has valid labels.

  python -m segvit_jax.data.check --config configs/segvit_vit_b16_ade20k.py \
      --config.dataset.root=/data/ADEChallengeData2016 [--split train|val|both] [--workers 8]

Reads each split once through `registry.get_source(config.dataset, split)` (the readers training
uses; nothing is re-implemented here), with a progress bar, and prints the counts (examples,
pixels, ignored pixels) and a class-frequency table (class id, name, share of the labelled
pixels, images containing the class). Exits non-zero listing EVERY bad example with its reason:
an undecodable image or label, a label whose size differs from its image, a label value outside
0..num_classes-1 that is not `ignore_index`. The sources raise ValueError naming the file for
these; `check_example` repeats the shape and range checks so any source is held to the record
contract (`files.py`). Panoptic records (masks + class ids) are counted by the class-id map of
their segments (`coco_panoptic.semantic_label`, void = ignore_index).

`check_source(source) -> Report` and `format_report(report)` need no CLI; the tests call them.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import sys
from collections.abc import Sequence

import numpy as np
from absl import flags
from ml_collections import config_flags
from tqdm import tqdm

from segvit_jax import runtime
from segvit_jax.data import coco_panoptic, files, registry
from segvit_jax.data.pipeline import BAD_EXAMPLE_ERRORS, example_file  # noqa: F401  (re-exported)


@dataclasses.dataclass
class Report:
  """What `check_source` found in one split.

  Pixel counts cover the good examples only. `class_pixels[k]` is the number of pixels of class
  k, `class_images[k]` the number of (good) examples containing class k; `bad` lists
  (file, reason) for every example that failed, in index order.
  """
  class_names: tuple[str, ...]
  ignore_index: int = 255
  split: str = ""
  num_examples: int = 0
  num_pixels: int = 0
  num_ignored: int = 0
  class_pixels: np.ndarray | None = None
  class_images: np.ndarray | None = None
  bad: list[tuple[str, str]] = dataclasses.field(default_factory=list)

  def __post_init__(self):
    k = len(self.class_names)
    if self.class_pixels is None:
      self.class_pixels = np.zeros(k, np.int64)
    if self.class_images is None:
      self.class_images = np.zeros(k, np.int64)

  @property
  def ok(self) -> bool:
    return not self.bad

  @property
  def num_good(self) -> int:
    return self.num_examples - len(self.bad)

  @property
  def num_labelled(self) -> int:
    return self.num_pixels - self.num_ignored

  def class_share(self) -> np.ndarray:
    """Per-class share (%) of the labelled (non-ignored) pixels."""
    return 100.0 * self.class_pixels / max(self.num_labelled, 1)


def check_example(record: dict, num_classes: int, ignore_index: int,
                  name: str) -> tuple[np.ndarray, int, int]:
  """(class pixel counts (num_classes,), pixels, ignored pixels) of one record.

  ValueError naming `name` if the image is not (H, W, 3), the label not (H, W) of the same size,
  or a label value is neither a class id nor `ignore_index`.
  """
  if "label" not in record and "masks" in record:  # panoptic: its segments' class-id map
    record = {"image": record["image"],
              "label": coco_panoptic.semantic_label(record, ignore_index)}
  image, label = np.asarray(record["image"]), np.asarray(record["label"])
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"{name}: image has shape {image.shape}, expected (H, W, 3)")
  if label.shape != image.shape[:2]:
    raise ValueError(f"{name}: label has shape {label.shape} but the image is {image.shape[:2]}")
  files.check_label(label, num_classes, ignore_index, name)
  label = label.ravel()
  ignored = label == ignore_index
  counts = np.bincount(label[~ignored].astype(np.int64), minlength=num_classes)
  return counts.astype(np.int64), int(label.size), int(ignored.sum())


def check_source(source, ignore_index: int | None = None, workers: int = 0,
                 progress: bool = True, split: str = "") -> Report:
  """Reads every example of `source` once (its own `__getitem__`) and returns the `Report`.

  Errors in `BAD_EXAMPLE_ERRORS` are recorded per example and the check goes on; anything else
  is a bug and propagates. `workers` > 0 decodes in a thread pool of that size; the report does
  not depend on it. `ignore_index` defaults to the source's (255 if it has none).
  """
  if ignore_index is None:
    ignore_index = getattr(source, "ignore_index", 255)
  report = Report(class_names=tuple(source.class_names), ignore_index=int(ignore_index),
                  split=split, num_examples=len(source))
  num_classes = len(report.class_names)

  def examine(index: int):
    name = example_file(source, index)
    try:
      return check_example(source[index], num_classes, report.ignore_index, name), None
    except BAD_EXAMPLE_ERRORS as e:
      return None, (name, str(e))

  indices = range(len(source))
  with tqdm(total=len(source), desc=f"checking {split}".strip(), unit="img", leave=False,
            disable=not progress, file=sys.stderr) as bar:
    if workers > 0:
      with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        _accumulate(report, pool.map(examine, indices), bar)
    else:
      _accumulate(report, map(examine, indices), bar)
  return report


def _accumulate(report: Report, results, bar) -> None:
  for stats, error in results:  # in index order, whatever the thread pool does
    if error is not None:
      report.bad.append(error)
    else:
      counts, pixels, ignored = stats
      report.class_pixels += counts
      report.class_images += counts > 0
      report.num_pixels += pixels
      report.num_ignored += ignored
    bar.update(1)


def format_report(report: Report) -> str:
  """The counts, the class-frequency table and the bad examples as text."""
  title = f"split {report.split}" if report.split else "dataset"
  ignored_pct = 100.0 * report.num_ignored / max(report.num_pixels, 1)
  lines = [
      f"{title}: {report.num_examples} examples ({report.num_good} good, {len(report.bad)} bad)",
      f"  pixels: {report.num_pixels} ({report.num_ignored} ignored = {ignored_pct:.2f}%, "
      f"ignore_index {report.ignore_index})",
  ]
  width = max([len("name")] + [len(n) for n in report.class_names])
  lines.append(f"  {'id':>4}  {'name':<{width}}  {'pixels %':>8}  {'images':>7}")
  for k, (name, share) in enumerate(zip(report.class_names, report.class_share())):
    lines.append(f"  {k:>4}  {name:<{width}}  {share:>8.2f}  {int(report.class_images[k]):>7}")
  unseen = [n for n, c in zip(report.class_names, report.class_images) if c == 0]
  if unseen:
    lines.append(f"  {len(unseen)} class(es) in no image: {', '.join(unseen)}")
  if report.bad:
    lines.append(f"  {len(report.bad)} bad example(s):")
    lines += [f"    {name}: {reason}" for name, reason in report.bad]
  return "\n".join(lines)


def check_splits(dataset_cfg, splits: Sequence[str], workers: int = 0,
                 progress: bool = True) -> list[Report]:
  """`check_source` of `registry.get_source(dataset_cfg, split)` for each split."""
  reports = []
  for split in splits:
    source = registry.get_source(dataset_cfg, split)
    reports.append(check_source(source, dataset_cfg.ignore_index, workers,
                                progress, split))
  return reports


# ----------------------------------------------------------------------------------------------
# Command line. Flags are defined only when run as a program (`runtime.run` calls
# `define_flags`), so importing this module (tests, other tools) does not clash with train.py's
# --config.


def define_flags() -> None:
  """The command line's flags."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:ARG]).",
                                  lock_config=True)
  flags.DEFINE_enum("split", "both", ["train", "val", "both"],
                    "Which split to check: config.dataset.train_split, eval_split or both.")
  flags.DEFINE_integer("workers", 0, "Threads decoding in parallel (0: the main thread).")
  flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
  runtime.no_arguments(argv)
  config = flags.FLAGS.config
  split_flag = flags.FLAGS.split
  splits = {"train": [config.dataset.train_split], "val": [config.dataset.eval_split],
            "both": [config.dataset.train_split, config.dataset.eval_split]}[split_flag]
  # Layout or config problems fail before any reading: one line (`runtime.run`).
  reports = check_splits(config.dataset, splits, workers=flags.FLAGS.workers)
  print("\n\n".join(format_report(r) for r in reports))
  bad = [(r.split, name) for r in reports for name, _ in r.bad]
  if bad:
    sys.exit(f"error: {len(bad)} bad example(s) in config.dataset {config.dataset.name!r} "
             f"(listed above)")


if __name__ == "__main__":
  sys.exit(runtime.run(main, define_flags=define_flags))
