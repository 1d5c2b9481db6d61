"""Readers for COCO-Stuff-10K, PASCAL-Context and Cityscapes, and class palettes (spec
datasets.md).

Sources are grain random-access sources like `sources.SegmentationFiles`: records
`dict(image=uint8 (H, W, 3) RGB, label=uint8 (H, W), name=file stem)` with labels in train ids
(classes 0..K-1, `ignore_index` 255 ignored), plus `class_names` and `palette` ((K, 3) uint8).
`BUILDERS` maps a dataset name to `builder(dataset_cfg, split)`; `sources.get_source` merges it
into its table. Layout problems raise FileNotFoundError naming the missing path and the expected
layout when the source is built.

  coco_stuff10k     root/images/{train2014,test2014}/NAME.jpg,
                    root/annotations/{train2014,test2014}/NAME_labelTrainIds.png (0..170, 255),
                    root/imageLists/{train,test}.txt (optional: when present they select the
                    split's images). Splits "train" and "test" ("val" = "test"). Write it from
                    the raw release with `python -m segvit_jax.data.cocostuff RAW OUT`. Files
                    written by mmseg's own converter hold 0 = unlabelled, 1..171: read them with
                    `reduce_zero_label=True`.
  pascal_context    root/VOCdevkit/VOC2010, or root = that VOC2010 directory:
                    JPEGImages/ID.jpg, SegmentationClassContext/ID.png (0..59, 0 = background,
                    a class), ImageSets/SegmentationContext/{train,val}.txt. 60 classes.
  pascal_context59  the same files with `reduce_zero_label` (background -> 255): 59 classes.
  cityscapes        root/leftImg8bit/{split}/CITY/X_leftImg8bit.png with
                    root/gtFine/{split}/CITY/X_gtFine_labelTrainIds.png (0..18, 255) or, where
                    no labelTrainIds file exists, X_gtFine_labelIds.png (raw ids 0..33, mapped
                    with the official table). Splits train, val, test (test labels are blank).
"""

from __future__ import annotations

import glob
import os

import numpy as np

from segvit_jax.data import cocostuff
from segvit_jax.data import sources

# pylint: disable=protected-access  (helpers shared with the ADE20K / folder readers)
_dataset_root = sources._dataset_root
_require_dir = sources._require_dir
# pylint: enable=protected-access

# ----------------------------------------------------------------------------------------------
# Class names, in train-id order.

# COCO-Stuff: the 80 used COCO things, then the 91 stuff classes (ids 1..182 of the COCO-Stuff
# label list without the 11 unused thing ids; = mmseg COCOStuffDataset.CLASSES).
COCO_STUFF_CLASSES = cocostuff.CLASS_NAMES

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

# ----------------------------------------------------------------------------------------------
# Palettes.

# Official Cityscapes label colours (cityscapesScripts labels.py), in train-id order.
CITYSCAPES_PALETTE = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
], dtype=np.uint8)


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
  """uint8 sRGB (..., 3) -> CIELAB (D65 white), float64."""
  c = rgb.astype(np.float64) / 255.0
  linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
  xyz = linear @ np.array([[0.4124, 0.3576, 0.1805],
                           [0.2126, 0.7152, 0.0722],
                           [0.0193, 0.1192, 0.9505]]).T
  t = xyz / np.array([0.95047, 1.0, 1.08883])
  delta = 6.0 / 29.0
  f = np.where(t > delta ** 3, np.cbrt(t), t / (3 * delta ** 2) + 4.0 / 29.0)
  return np.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]),
                   200.0 * (f[..., 1] - f[..., 2])], axis=-1)


def generated_palette(num_colours: int) -> np.ndarray:
  """(num_colours, 3) uint8 colours, each as far as possible (CIELAB distance) from the ones
  before it and from black.

  Greedy farthest-point selection over the 16^3 RGB grid with steps of 17, starting from black
  (kept for ignore pixels, never returned). Deterministic, and palette n is the first n rows of
  palette n + 1, so a class keeps its colour whatever the class count.
  """
  levels = np.arange(0, 256, 17)
  grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
  if not 0 <= num_colours < len(grid):
    raise ValueError(f"can generate 0..{len(grid) - 1} colours, not {num_colours}")
  lab = _srgb_to_lab(grid)
  nearest = np.linalg.norm(lab - lab[0], axis=-1)  # grid[0] is black
  chosen = []
  for _ in range(num_colours):
    i = int(np.argmax(nearest))
    chosen.append(i)
    nearest = np.minimum(nearest, np.linalg.norm(lab - lab[i], axis=-1))
  return grid[chosen].astype(np.uint8).reshape(num_colours, 3)


def _frozen(a: np.ndarray) -> np.ndarray:
  a.setflags(write=False)
  return a


_GENERATED = generated_palette(len(COCO_STUFF_CLASSES))

# Dataset name -> (K, 3) uint8 class colours, all distinct and none black. Cityscapes: the
# official colours. The others: `generated_palette` (mmseg's customary ADE20K / PASCAL-Context /
# COCO-Stuff palettes give some classes identical colours, e.g. ADE20K road and skyscraper are
# both (140, 140, 140), so they are not used). pascal_context59 is pascal_context without
# background, so a class has the same colour in both variants.
PALETTES: dict[str, np.ndarray] = {
    "ade20k": _frozen(_GENERATED[:len(sources.ADE20K_CLASSES)].copy()),
    "coco_stuff10k": _frozen(_GENERATED.copy()),
    "pascal_context": _frozen(_GENERATED[:len(PASCAL_CONTEXT_CLASSES)].copy()),
    "pascal_context59": _frozen(_GENERATED[1:len(PASCAL_CONTEXT_CLASSES)].copy()),
    "cityscapes": _frozen(CITYSCAPES_PALETTE),
}


def palette_for(dataset_name: str, num_classes: int) -> np.ndarray:
  """(num_classes, 3) uint8 class colours: `PALETTES[dataset_name]` when it has num_classes
  rows, else (other datasets, or e.g. ade20k without reduce_zero_label: 151 classes) the first
  num_classes colours of `generated_palette`. Black is never used (left for ignore pixels)."""
  palette = PALETTES.get(dataset_name)
  if palette is not None and len(palette) == num_classes:
    return palette.copy()
  return generated_palette(num_classes)


# ----------------------------------------------------------------------------------------------
# Label conversion and the source class.


def cityscapes_to_train_ids(ids: np.ndarray, ignore_index: int = 255) -> np.ndarray:
  """Raw Cityscapes label ids -> uint8 train ids 0..18 (official table), every other value
  (including -1, license plate) -> ignore_index."""
  table = np.full(256, ignore_index, np.uint8)
  for raw, train in CITYSCAPES_ID_TO_TRAIN_ID.items():
    table[raw] = train
  return table[np.clip(np.asarray(ids).astype(np.int64), 0, 255)]  # < 0 and > 255 -> table[0|255]


# ----------------------------------------------------------------------------------------------
# Layout helpers.


def _require_file(path: str, layout: str) -> None:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"missing file {path}; expected layout: {layout}")


def _listed_pairs(list_path: str, image_dir: str, image_ext: str, label_dir: str,
                  label_suffix: str, layout: str) -> list[tuple[str, str]]:
  """(image, label) paths for the names in a split list, in list order; FileNotFoundError
  naming the files the list names that do not exist."""
  _require_dir(image_dir, layout)
  _require_dir(label_dir, layout)
  _require_file(list_path, layout)
  names = cocostuff.read_list(list_path)
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


def _split(dataset: str, split: str, known: dict) -> str:
  if split not in known:
    raise ValueError(f"unknown {dataset} split {split!r}; known: {', '.join(known)}")
  return known[split]


# ----------------------------------------------------------------------------------------------
# COCO-Stuff-10K.

COCO_STUFF_SPLITS = {"train": "train", "test": "test", "val": "test", "train2014": "train",
                     "test2014": "test"}
_MMSEG_COCO_HINT = ("Labels written by mmseg's tools/dataset_converters/coco_stuff10k.py hold "
                    "0 = unlabelled and classes 1..171: read them with "
                    "config.dataset.reduce_zero_label = True")


def coco_stuff10k_source(root: str, split: str, reduce_zero: bool = False,
                         ignore_index: int = 255) -> sources.SegmentationFiles:
  """COCO-Stuff-10K in mmseg's layout (171 classes); root holds images/, annotations/ and
  optionally imageLists/. `reduce_zero` for label files that use 0 = unlabelled, 1..171."""
  list_name = _split("COCO-Stuff-10K", split, COCO_STUFF_SPLITS)
  folder = cocostuff.SPLITS[list_name]
  layout = (f"{{root}}/images/{folder}/NAME.jpg and {{root}}/annotations/{folder}/"
            f"NAME{cocostuff.LABEL_SUFFIX}, optionally {{root}}/imageLists/{list_name}.txt "
            "(write it from the raw release with python -m segvit_jax.data.cocostuff RAW ROOT)")
  _require_dir(root, layout)
  image_dir = os.path.join(root, "images", folder)
  label_dir = os.path.join(root, "annotations", folder)
  list_path = os.path.join(root, "imageLists", list_name + ".txt")
  if os.path.isfile(list_path):
    pairs = _listed_pairs(list_path, image_dir, ".jpg", label_dir, cocostuff.LABEL_SUFFIX,
                          layout)
  else:
    pairs = sources.paired_files(image_dir, label_dir, layout, cocostuff.LABEL_SUFFIX)
  return sources.SegmentationFiles(pairs, COCO_STUFF_CLASSES, reduce_zero, ignore_index,
                                   hint="" if reduce_zero else _MMSEG_COCO_HINT,
                                   palette=PALETTES["coco_stuff10k"])


# ----------------------------------------------------------------------------------------------
# PASCAL-Context.

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
                          ignore_index: int = 255) -> sources.SegmentationFiles:
  """PASCAL-Context with 60 classes (label 0 = background is a class) or 59 (reduce_zero_label:
  background ignored), from the same files."""
  if num_classes not in (59, 60):
    raise ValueError(f"PASCAL-Context has 59 or 60 classes, not {num_classes}")
  split = _split("PASCAL-Context", split, PASCAL_CONTEXT_SPLITS)
  voc, found = pascal_voc2010_dir(root)
  layout = (f"JPEGImages/ID.jpg, SegmentationClassContext/ID.png and "
            f"ImageSets/SegmentationContext/{split}.txt in the VOC2010 directory {found}")
  pairs = _listed_pairs(os.path.join(voc, "ImageSets", "SegmentationContext", split + ".txt"),
                        os.path.join(voc, "JPEGImages"), ".jpg",
                        os.path.join(voc, "SegmentationClassContext"), ".png", layout)
  if num_classes == 60:
    return sources.SegmentationFiles(pairs, PASCAL_CONTEXT_CLASSES, False, ignore_index,
                                     palette=PALETTES["pascal_context"])
  return sources.SegmentationFiles(pairs, PASCAL_CONTEXT59_CLASSES, True, ignore_index,
                                   palette=PALETTES["pascal_context59"])


# ----------------------------------------------------------------------------------------------
# Cityscapes.

CITYSCAPES_SPLITS = {"train": "train", "val": "val", "test": "test"}
CITYSCAPES_IMAGE_SUFFIX = "_leftImg8bit.png"
CITYSCAPES_TRAIN_ID_SUFFIX = "_gtFine_labelTrainIds.png"
CITYSCAPES_ID_SUFFIX = "_gtFine_labelIds.png"


def cityscapes_source(root: str, split: str, ignore_index: int = 255) -> sources.SegmentationFiles:
  """Cityscapes fine annotations (19 classes). Reads *_gtFine_labelTrainIds.png when the split
  has any, else maps *_gtFine_labelIds.png through `cityscapes_to_train_ids`."""
  split = _split("Cityscapes", split, CITYSCAPES_SPLITS)
  layout = (f"{{root}}/leftImg8bit/{split}/CITY/X{CITYSCAPES_IMAGE_SUFFIX} with "
            f"{{root}}/gtFine/{split}/CITY/X{CITYSCAPES_TRAIN_ID_SUFFIX} (or "
            f"X{CITYSCAPES_ID_SUFFIX})")
  _require_dir(root, layout)
  image_root = os.path.join(root, "leftImg8bit", split)
  label_root = os.path.join(root, "gtFine", split)
  _require_dir(image_root, layout)
  _require_dir(label_root, layout)
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
  return sources.SegmentationFiles(
      pairs, CITYSCAPES_CLASSES, False, ignore_index, palette=PALETTES["cityscapes"],
      label_map=None if use_train_ids else cityscapes_to_train_ids)


# ----------------------------------------------------------------------------------------------
# Builders (`sources.get_source`).


def _no_reduce_zero_label(dataset_cfg, hint: str) -> None:
  if dataset_cfg.get("reduce_zero_label", False):
    raise ValueError(f"config.dataset.reduce_zero_label is True but dataset "
                     f"{dataset_cfg.name!r} keeps label 0 as a class{hint}")


def _coco_stuff10k(dataset_cfg, split: str):
  return coco_stuff10k_source(_dataset_root(dataset_cfg), split,
                              dataset_cfg.get("reduce_zero_label", False),
                              dataset_cfg.get("ignore_index", 255))


def _pascal_context(dataset_cfg, split: str):
  _no_reduce_zero_label(dataset_cfg, " (background); 'pascal_context59' ignores background")
  return pascal_context_source(_dataset_root(dataset_cfg), split, 60,
                               dataset_cfg.get("ignore_index", 255))


def _pascal_context59(dataset_cfg, split: str):
  # Always reduce_zero_label (the flag may be set or left at its default False).
  return pascal_context_source(_dataset_root(dataset_cfg), split, 59,
                               dataset_cfg.get("ignore_index", 255))


def _cityscapes(dataset_cfg, split: str):
  _no_reduce_zero_label(dataset_cfg, " (road)")
  return cityscapes_source(_dataset_root(dataset_cfg), split,
                           dataset_cfg.get("ignore_index", 255))


BUILDERS = {
    "coco_stuff10k": _coco_stuff10k,
    "pascal_context": _pascal_context,
    "pascal_context59": _pascal_context59,
    "cityscapes": _cityscapes,
}
