"""Dataset readers: grain random-access sources of segmentation records (spec datasets.md).

Every source has `class_names` (a tuple of str) and yields records
`dict(image=uint8 (H, W, 3) RGB, label=uint8 (H, W), name=str)` whose labels are already in the
train-id convention: classes 0..K-1, `ignore_index` (255) ignored.

  synthetic  the built-in procedural set (`synthetic.py`), no files.
  ade20k     mmseg layout: root = ADEChallengeData2016 with images/{training,validation}/*.jpg
             and annotations/{training,validation}/*.png; `reduce_zero_label` maps 0 -> 255,
             v -> v - 1 (150 classes).
  folder     root/images/{split}/NAME.{jpg,jpeg,png} + root/annotations/{split}/NAME.png, class
             names in root/classes.txt, one per line.

Layout problems surface in `get_source` (FileNotFoundError naming the missing path and the
expected layout), before any training work. Files are decoded with PIL on access; an unreadable
file or an out-of-range label raises ValueError naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from segvit_jax.data import synthetic

# ADE20K SceneParsing 150 classes, in train-id order (mmseg ADE20KDataset).
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug",
    "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning",
    "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole",
    "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van",
    "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle",
    "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase",
    "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
assert len(ADE20K_CLASSES) == 150

ADE20K_SPLITS = {"train": "training", "val": "validation", "training": "training",
                 "validation": "validation"}
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


# ----------------------------------------------------------------------------------------------
# File-backed sources.


class SegmentationFiles:
  """grain RandomAccessDataSource over (image, label) file pairs.

  Records: dict(image=uint8 (H, W, 3), label=uint8 (H, W), name=file stem). `label_map`
  (raw label, ignore_index) -> train ids runs before `reduce_zero_label` and the range check;
  `hint` is appended to range errors; `palette` (K, 3) uint8 is the dataset's class colours.
  """

  def __init__(self, pairs: Sequence[tuple[str, str]], class_names: Sequence[str],
               reduce_zero_label: bool = False, ignore_index: int = 255, *,
               label_map=None, hint: str = "", palette: np.ndarray | None = None):
    self.pairs = list(pairs)
    self.class_names = tuple(class_names)
    self.reduce_zero_label = reduce_zero_label
    self.ignore_index = ignore_index
    self.label_map = label_map
    self.hint = hint
    self.palette = palette

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


def _require_dir(path: str, layout: str) -> None:
  if not os.path.isdir(path):
    shown = path if os.path.isabs(path) else f"{path} (= {os.path.abspath(path)})"
    raise FileNotFoundError(f"missing directory {shown}; expected layout: {layout}. Point "
                            "--config.dataset.root at the dataset.")


def paired_files(image_dir: str, label_dir: str, layout: str,
                 label_suffix: str = ".png") -> list[tuple[str, str]]:
  """(image, label) paths for every image in image_dir, sorted by name.

  Raises FileNotFoundError if a directory is missing, holds no images, or an image has no label.
  """
  _require_dir(image_dir, layout)
  _require_dir(label_dir, layout)
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


def ade20k_source(root: str, split: str, reduce_zero: bool = True,
                  ignore_index: int = 255) -> SegmentationFiles:
  """ADE20K in mmseg's folder layout; root is the ADEChallengeData2016 directory."""
  if split not in ADE20K_SPLITS:
    raise ValueError(f"unknown ADE20K split {split!r}; known: {sorted(ADE20K_SPLITS)}")
  folder = ADE20K_SPLITS[split]
  layout = (f"{{root}}/images/{folder}/*.jpg and {{root}}/annotations/{folder}/*.png with root "
            "the ADEChallengeData2016 directory")
  _require_dir(root, layout)
  pairs = paired_files(os.path.join(root, "images", folder),
                       os.path.join(root, "annotations", folder), layout)
  # Without reduce_zero_label the raw ids 0..150 are the classes, 0 being "other".
  names = ADE20K_CLASSES if reduce_zero else ("other",) + ADE20K_CLASSES
  return SegmentationFiles(pairs, names, reduce_zero, ignore_index)


def read_class_names(path: str) -> tuple[str, ...]:
  """Class names from a text file, one per line (blank lines skipped)."""
  with open(path, encoding="utf-8") as f:
    names = tuple(line.strip() for line in f if line.strip())
  if not names:
    raise ValueError(f"{path} lists no class names")
  return names


def folder_source(root: str, split: str, reduce_zero: bool = False,
                  ignore_index: int = 255) -> SegmentationFiles:
  """Custom folder: root/images/{split}/NAME.{jpg,png}, root/annotations/{split}/NAME.png,
  root/classes.txt."""
  layout = ("{root}/images/{split}/NAME.{jpg,png}, {root}/annotations/{split}/NAME.png and "
            "{root}/classes.txt (one class name per line)")
  _require_dir(root, layout)
  classes_path = os.path.join(root, "classes.txt")
  if not os.path.isfile(classes_path):
    raise FileNotFoundError(f"missing file {classes_path}; expected layout: {layout}")
  pairs = paired_files(os.path.join(root, "images", split),
                       os.path.join(root, "annotations", split), layout)
  return SegmentationFiles(pairs, read_class_names(classes_path), reduce_zero, ignore_index)


# ----------------------------------------------------------------------------------------------
# Entry point.


def _dataset_root(dataset_cfg) -> str:
  root = os.path.expanduser(dataset_cfg.get("root", "") or "")
  if not root:
    raise FileNotFoundError(f"config.dataset.root is empty; set it to the {dataset_cfg.name} "
                            "directory")
  return root


def _synthetic(dataset_cfg, split: str):
  is_train = split == dataset_cfg.get("train_split", "train")
  num = dataset_cfg.num_train if is_train else dataset_cfg.num_eval
  return synthetic.SyntheticSegmentation(split, num, dataset_cfg.image_size,
                                         seed=dataset_cfg.get("seed", 0))


def _folder_builder(build):
  def builder(dataset_cfg, split: str):
    return build(_dataset_root(dataset_cfg), split, dataset_cfg.get("reduce_zero_label", False),
                 dataset_cfg.get("ignore_index", 255))
  return builder


def builders() -> dict:
  """Dataset name -> `builder(dataset_cfg, split) -> source`. Dataset modules contribute their
  own `BUILDERS` tables."""
  # pylint: disable=g-import-not-at-top  (those modules build on this one)
  from segvit_jax.data import coco_panoptic, datasets, tfds_sources
  return {
      "synthetic": _synthetic,
      "ade20k": _folder_builder(ade20k_source),
      "folder": _folder_builder(folder_source),
      **datasets.BUILDERS,
      **tfds_sources.BUILDERS,
      **coco_panoptic.BUILDERS,
  }


def get_source(dataset_cfg, split: str):
  """The source for `config.dataset` and a split name ("train" / "val" or the folder's name).

  For "synthetic", the split equal to `dataset_cfg.train_split` has `num_train` examples and any
  other `num_eval`. Checks that `dataset_cfg.num_classes` matches the dataset's class list.
  """
  name = dataset_cfg.name
  known = builders()
  if name not in known:
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(known)}")
  source = known[name](dataset_cfg, split)
  num_classes = dataset_cfg.get("num_classes", None)
  if num_classes is not None and num_classes != len(source.class_names):
    raise ValueError(f"config.dataset.num_classes is {num_classes} but dataset {name!r} has "
                     f"{len(source.class_names)} classes")
  return source
