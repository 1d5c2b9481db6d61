"""A custom dataset in a plain folder layout (dataset name "folder").

  root/images/{split}/NAME.{jpg,jpeg,png}
  root/annotations/{split}/NAME.png        single channel, classes 0..K-1, 255 ignored
  root/classes.txt                         the K class names, one per line

`config.dataset.reduce_zero_label` applies as for any mmseg dataset (0 -> 255, v -> v - 1).
"""

from __future__ import annotations

import os

from segvit_jax.data import files

LAYOUT = ("{root}/images/{split}/NAME.{jpg,png}, {root}/annotations/{split}/NAME.png and "
          "{root}/classes.txt (one class name per line)")


def read_class_names(path: str) -> tuple[str, ...]:
  """Class names from a text file, one per line (blank lines skipped)."""
  with open(path, encoding="utf-8") as f:
    names = tuple(line.strip() for line in f if line.strip())
  if not names:
    raise ValueError(f"{path} lists no class names")
  return names


def folder_source(root: str, split: str, reduce_zero: bool = False,
                  ignore_index: int = 255) -> files.SegmentationFiles:
  """Custom folder: root/images/{split}/NAME.{jpg,png}, root/annotations/{split}/NAME.png,
  root/classes.txt."""
  files.require_dir(root, LAYOUT)
  classes_path = os.path.join(root, "classes.txt")
  files.require_file(classes_path, LAYOUT)
  pairs = files.paired_files(os.path.join(root, "images", split),
                             os.path.join(root, "annotations", split), LAYOUT)
  return files.SegmentationFiles(pairs, read_class_names(classes_path), reduce_zero, ignore_index)


def build(dataset_cfg, split: str) -> files.SegmentationFiles:
  """The "folder" source of `config.dataset` (root, reduce_zero_label, ignore_index)."""
  return folder_source(files.dataset_root(dataset_cfg), split,
                       dataset_cfg.reduce_zero_label,
                       dataset_cfg.ignore_index)
