"""Cityscapes fine annotations (19 classes).

  root/leftImg8bit/{split}/CITY/X_leftImg8bit.png with
  root/gtFine/{split}/CITY/X_gtFine_labelTrainIds.png (0..18, 255) or, where no labelTrainIds
  file exists, X_gtFine_labelIds.png (raw ids 0..33, mapped with the official table).

Splits train, val, test (test labels are blank). The official id table is also what the TFDS
Cityscapes source (`tfds.py`) maps its raw labels with.
"""

from __future__ import annotations

import glob
import os

import numpy as np

from segvit_jax.data import files

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)

# Official Cityscapes table (cityscapesScripts helpers/labels.py): raw label id -> train id
# for the 19 evaluated classes. Every other id (0-6 void, 9 parking, 10 rail track, 14 guard
# rail, 15 bridge, 16 tunnel, 18 polegroup, 29 caravan, 30 trailer, -1 license plate) -> ignore.
CITYSCAPES_ID_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}

CITYSCAPES_SPLITS = {"train": "train", "val": "val", "test": "test"}
CITYSCAPES_IMAGE_SUFFIX = "_leftImg8bit.png"
CITYSCAPES_TRAIN_ID_SUFFIX = "_gtFine_labelTrainIds.png"
CITYSCAPES_ID_SUFFIX = "_gtFine_labelIds.png"


def cityscapes_to_train_ids(ids: np.ndarray, ignore_index: int = 255) -> np.ndarray:
  """Raw Cityscapes label ids -> uint8 train ids 0..18 (official table), every other value
  (including -1, license plate) -> ignore_index."""
  table = files.lookup_table(CITYSCAPES_ID_TO_TRAIN_ID, ignore_index)
  return table[np.clip(np.asarray(ids).astype(np.int64), 0, 255)]  # < 0 and > 255 -> table[0|255]


def cityscapes_source(root: str, split: str, ignore_index: int = 255) -> files.SegmentationFiles:
  """Cityscapes fine annotations (19 classes). Reads *_gtFine_labelTrainIds.png when the split
  has any, else maps *_gtFine_labelIds.png through `cityscapes_to_train_ids`."""
  split = files.split_name("Cityscapes", split, CITYSCAPES_SPLITS)
  layout = (f"{{root}}/leftImg8bit/{split}/CITY/X{CITYSCAPES_IMAGE_SUFFIX} with "
            f"{{root}}/gtFine/{split}/CITY/X{CITYSCAPES_TRAIN_ID_SUFFIX} (or "
            f"X{CITYSCAPES_ID_SUFFIX})")
  files.require_dir(root, layout)
  image_root = os.path.join(root, "leftImg8bit", split)
  label_root = os.path.join(root, "gtFine", split)
  files.require_dir(image_root, layout)
  files.require_dir(label_root, layout)
  use_train_ids = bool(glob.glob(os.path.join(glob.escape(label_root), "*",
                                              "*" + CITYSCAPES_TRAIN_ID_SUFFIX)))
  label_suffix = CITYSCAPES_TRAIN_ID_SUFFIX if use_train_ids else CITYSCAPES_ID_SUFFIX
  pairs, missing = [], []
  for city in sorted(os.listdir(image_root)):
    city_dir = os.path.join(image_root, city)
    if not os.path.isdir(city_dir):
      continue
    for f in sorted(os.listdir(city_dir)):
      if not f.endswith(CITYSCAPES_IMAGE_SUFFIX):
        continue
      label = os.path.join(label_root, city, f[:-len(CITYSCAPES_IMAGE_SUFFIX)] + label_suffix)
      pairs.append((os.path.join(city_dir, f), label))
      if not os.path.isfile(label):
        missing.append(label)
  if not pairs:
    raise FileNotFoundError(f"no CITY/*{CITYSCAPES_IMAGE_SUFFIX} images in {image_root}; "
                            f"expected layout: {layout}")
  if missing:
    shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
    raise FileNotFoundError(f"{len(missing)} image(s) in {image_root} have no label file: "
                            f"{shown}; expected layout: {layout}")
  return files.SegmentationFiles(pairs, CITYSCAPES_CLASSES, False, ignore_index,
                                 label_map=None if use_train_ids else cityscapes_to_train_ids)


def build(dataset_cfg, split: str) -> files.SegmentationFiles:
  """The "cityscapes" source of `config.dataset` (root, ignore_index; no reduce_zero_label)."""
  files.no_reduce_zero_label(dataset_cfg, " (road)")
  return cityscapes_source(files.dataset_root(dataset_cfg), split,
                           dataset_cfg.ignore_index)
