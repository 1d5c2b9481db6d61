"""ADE20K SceneParsing (150 classes) in mmseg's folder layout.

  root = ADEChallengeData2016 with images/{training,validation}/*.jpg and
  annotations/{training,validation}/*.png (8-bit, label 0 = "other").

`reduce_zero_label` maps 0 -> 255 and v -> v - 1 (classes 0..149, the benchmark's 150);
without it the raw ids 0..150 are the classes, "other" first (151 classes).
"""

from __future__ import annotations

import os

from segvit_jax.data import files

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


def class_names(reduce_zero: bool) -> tuple[str, ...]:
  """The classes in train-id order: the 150, or without reduce_zero_label the raw ids 0..150,
  0 being "other"."""
  return ADE20K_CLASSES if reduce_zero else ("other",) + ADE20K_CLASSES


def ade20k_source(root: str, split: str, reduce_zero: bool = True,
                  ignore_index: int = 255) -> files.SegmentationFiles:
  """ADE20K in mmseg's folder layout; root is the ADEChallengeData2016 directory."""
  if split not in ADE20K_SPLITS:
    raise ValueError(f"unknown ADE20K split {split!r}; known: {sorted(ADE20K_SPLITS)}")
  folder = ADE20K_SPLITS[split]
  layout = (f"{{root}}/images/{folder}/*.jpg and {{root}}/annotations/{folder}/*.png with root "
            "the ADEChallengeData2016 directory")
  files.require_dir(root, layout)
  pairs = files.paired_files(os.path.join(root, "images", folder),
                             os.path.join(root, "annotations", folder), layout)
  return files.SegmentationFiles(pairs, class_names(reduce_zero), reduce_zero, ignore_index)


def _reduce_zero(dataset_cfg) -> bool:
  return bool(dataset_cfg.reduce_zero_label)


def build(dataset_cfg, split: str) -> files.SegmentationFiles:
  """The "ade20k" source of `config.dataset` (root, reduce_zero_label, ignore_index)."""
  return ade20k_source(files.dataset_root(dataset_cfg), split, _reduce_zero(dataset_cfg),
                       dataset_cfg.ignore_index)


def config_class_names(dataset_cfg) -> tuple[str, ...]:
  """`build(dataset_cfg, ...).class_names` without reading the data."""
  return class_names(_reduce_zero(dataset_cfg))
