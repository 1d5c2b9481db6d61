"""Reading (image, label) file pairs: what every file-backed dataset module shares.

Every source yields records `dict(image=uint8 (H, W, 3) RGB, label=uint8 (H, W), name=str)`
whose labels are already in the train-id convention: classes 0..K-1, `ignore_index` (255)
ignored, and has `class_names` (a tuple of str).

Layout problems surface when a source is built (FileNotFoundError naming the missing path and
the expected layout), before any training work. Files are decoded with PIL on access; an
unreadable file or an out-of-range label raises ValueError naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


# ----------------------------------------------------------------------------------------------
# Decoding and label conventions.


def read_image(path: str) -> np.ndarray:
  """Decode an image file to uint8 RGB (H, W, 3); ValueError naming the file if it fails."""
  try:
    with Image.open(path) as img:
      return np.asarray(img.convert("RGB"), dtype=np.uint8)
  except (OSError, ValueError, SyntaxError) as e:  # PIL raises all of these on bad files
    raise ValueError(f"cannot decode image {path}: {e}") from e


def read_label(path: str) -> np.ndarray:
  """Decode a single-channel label PNG to an integer (H, W) array (palette PNGs: the indices)."""
  try:
    with Image.open(path) as img:
      if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
        raise ValueError(f"expected a single-channel (L, P or I) label image, got mode {img.mode}")
      return np.asarray(img)
  except (OSError, ValueError, SyntaxError) as e:
    raise ValueError(f"cannot decode label {path}: {e}") from e


def reduce_zero_label(label: np.ndarray, ignore_index: int = 255) -> np.ndarray:
  """mmseg `reduce_zero_label`: 0 -> ignore, v -> v - 1, ignore stays ignore."""
  label = label.astype(np.int32)
  out = label - 1
  out[label == 0] = ignore_index
  out[label == ignore_index] = ignore_index
  return out


def check_label(label: np.ndarray, num_classes: int, ignore_index: int, path: str) -> np.ndarray:
  """Return the label as uint8 after checking every value is in [0, num_classes) or ignore."""
  bad = (label < 0) | ((label >= num_classes) & (label != ignore_index))
  if bad.any():
    values = np.unique(label[bad])
    shown = ", ".join(str(int(v)) for v in values[:10]) + (" ..." if len(values) > 10 else "")
    raise ValueError(
        f"label {path} has value(s) {shown} outside the valid range 0..{num_classes - 1} "
        f"(ignore_index {ignore_index})")
  return label.astype(np.uint8)


def lookup_table(mapping: Mapping[int, int], ignore_index: int = 255) -> np.ndarray:
  """uint8 table of 256 entries: table[k] = mapping[k], ignore_index for every other k."""
  table = np.full(256, ignore_index, np.uint8)
  for k, v in mapping.items():
    table[k] = v
  return table


# ----------------------------------------------------------------------------------------------
# The source class.


class SegmentationFiles:
  """grain RandomAccessDataSource over (image, label) file pairs.

  Records: dict(image=uint8 (H, W, 3), label=uint8 (H, W), name=file stem). `label_map`
  (raw label, ignore_index) -> train ids runs before `reduce_zero_label` and the range check;
  `hint` is appended to range errors.
  """

  def __init__(self, pairs: Sequence[tuple[str, str]], class_names: Sequence[str],
               reduce_zero_label: bool = False, ignore_index: int = 255, *,
               label_map: Callable[[np.ndarray, int], np.ndarray] | None = None,
               hint: str = ""):
    self.pairs = list(pairs)
    self.class_names = tuple(class_names)
    self.reduce_zero_label = reduce_zero_label
    self.ignore_index = ignore_index
    self.label_map = label_map
    self.hint = hint

  def __len__(self) -> int:
    return len(self.pairs)

  def __getitem__(self, index: int) -> dict:
    image_path, label_path = self.pairs[int(index)]
    image = read_image(image_path)
    label = read_label(label_path)
    if label.shape != image.shape[:2]:
      raise ValueError(f"label {label_path} is {label.shape[1]}x{label.shape[0]} (WxH) but image "
                       f"{image_path} is {image.shape[1]}x{image.shape[0]}")
    if self.label_map is not None:
      label = self.label_map(label, self.ignore_index)
    if self.reduce_zero_label:
      label = reduce_zero_label(label, self.ignore_index)
    try:
      label = check_label(label, len(self.class_names), self.ignore_index, label_path)
    except ValueError as e:
      if not self.hint:
        raise
      raise ValueError(f"{e}. {self.hint}") from None
    name = os.path.splitext(os.path.basename(image_path))[0]
    return dict(image=image, label=label, name=name)

  def __repr__(self) -> str:
    return f"SegmentationFiles({len(self)} examples, {len(self.class_names)} classes)"


# ----------------------------------------------------------------------------------------------
# Layouts.


def require_dir(path: str, layout: str) -> None:
  """FileNotFoundError naming `path` (and its absolute form) and the expected layout unless
  it is a directory."""
  if not os.path.isdir(path):
    shown = path if os.path.isabs(path) else f"{path} (= {os.path.abspath(path)})"
    raise FileNotFoundError(f"missing directory {shown}; expected layout: {layout}. Point "
                            "--config.dataset.root at the dataset.")


def require_file(path: str, layout: str) -> None:
  """FileNotFoundError naming `path` and the expected layout unless it is a file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"missing file {path}; expected layout: {layout}")


def paired_files(image_dir: str, label_dir: str, layout: str,
                 label_suffix: str = ".png") -> list[tuple[str, str]]:
  """(image, label) paths for every image in image_dir, sorted by name.

  Raises FileNotFoundError if a directory is missing, holds no images, or an image has no label.
  """
  require_dir(image_dir, layout)
  require_dir(label_dir, layout)
  stems = sorted(os.path.splitext(f) for f in os.listdir(image_dir)
                 if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS)
  if not stems:
    raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {image_dir}; "
                            f"expected layout: {layout}")
  pairs, missing = [], []
  for stem, ext in stems:
    label_path = os.path.join(label_dir, stem + label_suffix)
    if os.path.isfile(label_path):
      pairs.append((os.path.join(image_dir, stem + ext), label_path))
    else:
      missing.append(label_path)
  if missing:
    raise FileNotFoundError(f"{len(missing)} image(s) in {image_dir} have no label file, e.g. "
                            f"{missing[0]}; expected layout: {layout}")
  return pairs


def read_list(path: str) -> list[str]:
  """Image names from a list file, one per line (blank lines skipped, a .jpg/.mat/.png
  extension dropped)."""
  with open(path, encoding="utf-8") as f:
    names = [line.strip() for line in f if line.strip()]
  return [n[:-4] if n.lower().endswith((".jpg", ".mat", ".png")) else n for n in names]


def listed_pairs(list_path: str, image_dir: str, image_ext: str, label_dir: str,
                 label_suffix: str, layout: str) -> list[tuple[str, str]]:
  """(image, label) paths for the names in a split list, in list order; FileNotFoundError
  naming the files the list names that do not exist."""
  require_dir(image_dir, layout)
  require_dir(label_dir, layout)
  require_file(list_path, layout)
  names = read_list(list_path)
  if not names:
    raise FileNotFoundError(f"{list_path} names no images; expected layout: {layout}")
  pairs = [(os.path.join(image_dir, n + image_ext), os.path.join(label_dir, n + label_suffix))
           for n in names]
  missing = [p for pair in pairs for p in pair if not os.path.isfile(p)]
  if missing:
    shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
    raise FileNotFoundError(f"{len(missing)} file(s) named in {list_path} do not exist: "
                            f"{shown}; expected layout: {layout}")
  return pairs


# ----------------------------------------------------------------------------------------------
# Reading `config.dataset`.


def dataset_root(dataset_cfg, what: str | None = None) -> str:
  """`config.dataset.root`, user-expanded; FileNotFoundError if empty, saying it should be
  `what` (default: the {dataset name} directory)."""
  root = os.path.expanduser(dataset_cfg.root or "")
  if not root:
    what = what or f"the {dataset_cfg.name} directory"
    raise FileNotFoundError(f"config.dataset.root is empty; set it to {what}")
  return root


def split_name(dataset: str, split: str, known: Mapping[str, str]) -> str:
  """`known[split]` (our split name -> the dataset's); ValueError listing the known names."""
  if split not in known:
    raise ValueError(f"unknown {dataset} split {split!r}; known: {', '.join(known)}")
  return known[split]


def no_reduce_zero_label(dataset_cfg, hint: str) -> None:
  """ValueError if `config.dataset.reduce_zero_label` is set for a dataset whose label 0 is a
  class; `hint` follows the message."""
  if dataset_cfg.reduce_zero_label:
    raise ValueError(f"config.dataset.reduce_zero_label is True but dataset "
                     f"{dataset_cfg.name!r} keeps label 0 as a class{hint}")
