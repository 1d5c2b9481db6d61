"""PASCAL-Context: 60 classes with background ("pascal_context") or 59 without
("pascal_context59"), read from the same files.

  root/VOCdevkit/VOC2010, or root = that VOC2010 directory: JPEGImages/ID.jpg,
  SegmentationClassContext/ID.png (0..59, 0 = background), ImageSets/SegmentationContext/
  {train,val}.txt.

60 classes: label 0 (background) is a class. 59 classes: `reduce_zero_label`, background
ignored. The SegViT paper reports both mIoU59 and mIoU60.
"""

from __future__ import annotations

import os

from segvit_jax.data import files

# PASCAL-Context 60 (mmseg PascalContextDataset): background, then the 59 classes in the order
# of their ids in the 459-label PASCAL-Context list.
PASCAL_CONTEXT_CLASSES = (
    "background", "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat",
    "book", "bottle", "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth",
    "computer", "cow", "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food",
    "grass", "ground", "horse", "keyboard", "light", "motorbike", "mountain", "mouse", "person",
    "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves", "sidewalk", "sign",
    "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall",
    "water", "window", "wood",
)
assert len(PASCAL_CONTEXT_CLASSES) == 60
PASCAL_CONTEXT59_CLASSES = PASCAL_CONTEXT_CLASSES[1:]

PASCAL_CONTEXT_SPLITS = {"train": "train", "val": "val"}


def pascal_voc2010_dir(root: str) -> tuple[str, str]:
  """(the VOC2010 directory, how it was found): root/VOCdevkit/VOC2010, or root itself when it
  holds JPEGImages/."""
  nested = os.path.join(root, "VOCdevkit", "VOC2010")
  if os.path.isdir(nested):
    return nested, f"{nested} (root/VOCdevkit/VOC2010)"
  if os.path.isdir(os.path.join(root, "JPEGImages")):
    return root, f"{root} (root is the VOC2010 directory)"
  raise FileNotFoundError(
      f"found neither {nested} nor {os.path.join(root, 'JPEGImages')}: point "
      "--config.dataset.root at the directory holding VOCdevkit/VOC2010 or at VOC2010 itself, "
      "which holds JPEGImages/*.jpg, SegmentationClassContext/*.png and "
      "ImageSets/SegmentationContext/{train,val}.txt")


def pascal_context_source(root: str, split: str, num_classes: int = 60,
                          ignore_index: int = 255) -> files.SegmentationFiles:
  """PASCAL-Context with 60 classes (label 0 = background is a class) or 59 (reduce_zero_label:
  background ignored), from the same files."""
  if num_classes not in (59, 60):
    raise ValueError(f"PASCAL-Context has 59 or 60 classes, not {num_classes}")
  split = files.split_name("PASCAL-Context", split, PASCAL_CONTEXT_SPLITS)
  voc, found = pascal_voc2010_dir(root)
  layout = (f"JPEGImages/ID.jpg, SegmentationClassContext/ID.png and "
            f"ImageSets/SegmentationContext/{split}.txt in the VOC2010 directory {found}")
  pairs = files.listed_pairs(
      os.path.join(voc, "ImageSets", "SegmentationContext", split + ".txt"),
      os.path.join(voc, "JPEGImages"), ".jpg", os.path.join(voc, "SegmentationClassContext"),
      ".png", layout)
  if num_classes == 60:
    return files.SegmentationFiles(pairs, PASCAL_CONTEXT_CLASSES, False, ignore_index)
  return files.SegmentationFiles(pairs, PASCAL_CONTEXT59_CLASSES, True, ignore_index)


def build(dataset_cfg, split: str) -> files.SegmentationFiles:
  """The "pascal_context" (60 classes) source of `config.dataset` (root, ignore_index)."""
  files.no_reduce_zero_label(dataset_cfg,
                             " (background); 'pascal_context59' ignores background")
  return pascal_context_source(files.dataset_root(dataset_cfg), split, 60,
                               dataset_cfg.ignore_index)


def build59(dataset_cfg, split: str) -> files.SegmentationFiles:
  """The "pascal_context59" source: always reduce_zero_label (the flag may be set or left at
  its default False)."""
  return pascal_context_source(files.dataset_root(dataset_cfg), split, 59,
                               dataset_cfg.ignore_index)
