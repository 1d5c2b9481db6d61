"""COCO-Stuff-10K (171 classes): the reader of mmseg's folder layout and the converter that
writes that layout from the raw release.

Layout read (dataset name "coco_stuff10k"):

  root/images/{train2014,test2014}/NAME.jpg
  root/annotations/{train2014,test2014}/NAME_labelTrainIds.png  8-bit: 0..170, 255 unlabelled
  root/imageLists/{train,test}.txt  optional: when present they select the split's images

Splits "train" and "test" ("val" = "test"). Files written by mmseg's own converter
(`tools/dataset_converters/coco_stuff10k.py`) hold 0 = unlabelled and classes 1..171: read them
with `reduce_zero_label=True`.

The converter:

  python -m segvit_jax.data.coco_stuff RAW OUT [--symlink]

(`python -m segvit_jax.data.cocostuff` is the same command under its old name.) RAW is the
unpacked cocostuff-10k release:

  RAW/images/NAME.jpg
  RAW/annotations/NAME.mat        label map under key "S": 0 = unlabelled, 1..182 COCO-Stuff ids
  RAW/imageLists/{train,test}.txt NAME per line (9,000 / 1,000)

OUT receives the layout above (images copied, or linked with --symlink; lists copied). Only 171
of the 182 ids are used: the 11 COCO thing ids dropped from the 2014 detection challenge never
occur. `cocostuff_to_train_ids` maps the 171 used ids, in order, to 0..170 and 0 plus the unused
ids to 255.
"""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
from absl import app, flags
from PIL import Image

from segvit_jax import runtime
from segvit_jax.data import files

# The COCO-Stuff label list: names of ids 1..182 (cocostuff labels.txt): 1..91 COCO things
# (including the 11 unused ids), 92..182 stuff.
COCOSTUFF_LABELS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "street sign", "stop sign", "parking meter", "bench", "bird",
    "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "hat",
    "backpack", "umbrella", "shoe", "eye glasses", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard",
    "surfboard", "tennis racket", "bottle", "plate", "wine glass", "cup", "fork", "knife",
    "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog",
    "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "mirror", "dining table",
    "window", "desk", "toilet", "door", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "blender", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush", "hair brush",
    # Stuff, 92..182.
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage",
    "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds",
    "counter", "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence",
    "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog",
    "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house",
    "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net",
    "paper", "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield",
    "railing", "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea",
    "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone", "straw",
    "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable",
    "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)
assert len(COCOSTUFF_LABELS) == 182

# COCO thing ids without annotations (street sign, hat, shoe, eye glasses, plate, mirror,
# window, desk, door, blender, hair brush).
UNUSED_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91)
MAX_ID = 182
USED_IDS = tuple(i for i in range(1, MAX_ID + 1) if i not in UNUSED_IDS)
# The 171 classes in train-id order: the 80 things, then the 91 stuff classes (= mmseg
# COCOStuffDataset.CLASSES).
COCO_STUFF_CLASSES = tuple(COCOSTUFF_LABELS[i - 1] for i in USED_IDS)
assert len(COCO_STUFF_CLASSES) == 171

SPLITS = {"train": "train2014", "test": "test2014"}  # list name -> mmseg folder name
LABEL_SUFFIX = "_labelTrainIds.png"


def cocostuff_to_train_ids(ids: np.ndarray, ignore_index: int = 255) -> np.ndarray:
  """COCO-Stuff ids (0 unlabelled, 1..182) -> uint8 train ids 0..170, `ignore_index` for 0 and
  the unused thing ids. ValueError if an id lies outside 0..182."""
  ids = np.asarray(ids)
  bad = (ids < 0) | (ids > MAX_ID)
  if bad.any():
    values = np.unique(ids[bad])
    shown = ", ".join(str(v) for v in values[:10]) + (" ..." if len(values) > 10 else "")
    raise ValueError(f"COCO-Stuff id(s) {shown} outside 0..{MAX_ID}")
  table = files.lookup_table(dict(zip(USED_IDS, range(len(USED_IDS)))), ignore_index)
  return table[ids.astype(np.int64)]


# ----------------------------------------------------------------------------------------------
# Reader of the converted layout.

COCO_STUFF_SPLITS = {"train": "train", "test": "test", "val": "test", "train2014": "train",
                     "test2014": "test"}
_MMSEG_COCO_HINT = ("Labels written by mmseg's tools/dataset_converters/coco_stuff10k.py hold "
                    "0 = unlabelled and classes 1..171: read them with "
                    "config.dataset.reduce_zero_label = True")


def coco_stuff10k_source(root: str, split: str, reduce_zero: bool = False,
                         ignore_index: int = 255) -> files.SegmentationFiles:
  """COCO-Stuff-10K in mmseg's layout (171 classes); root holds images/, annotations/ and
  optionally imageLists/. `reduce_zero` for label files that use 0 = unlabelled, 1..171."""
  list_name = files.split_name("COCO-Stuff-10K", split, COCO_STUFF_SPLITS)
  folder = SPLITS[list_name]
  layout = (f"{{root}}/images/{folder}/NAME.jpg and {{root}}/annotations/{folder}/"
            f"NAME{LABEL_SUFFIX}, optionally {{root}}/imageLists/{list_name}.txt "
            "(write it from the raw release with python -m segvit_jax.data.coco_stuff RAW ROOT)")
  files.require_dir(root, layout)
  image_dir = os.path.join(root, "images", folder)
  label_dir = os.path.join(root, "annotations", folder)
  list_path = os.path.join(root, "imageLists", list_name + ".txt")
  if os.path.isfile(list_path):
    pairs = files.listed_pairs(list_path, image_dir, ".jpg", label_dir, LABEL_SUFFIX, layout)
  else:
    pairs = files.paired_files(image_dir, label_dir, layout, LABEL_SUFFIX)
  return files.SegmentationFiles(pairs, COCO_STUFF_CLASSES, reduce_zero, ignore_index,
                                 hint="" if reduce_zero else _MMSEG_COCO_HINT)


def build(dataset_cfg, split: str) -> files.SegmentationFiles:
  """The "coco_stuff10k" source of `config.dataset` (root, reduce_zero_label, ignore_index)."""
  return coco_stuff10k_source(files.dataset_root(dataset_cfg), split,
                              dataset_cfg.reduce_zero_label,
                              dataset_cfg.ignore_index)


# ----------------------------------------------------------------------------------------------
# Converter of the raw release.


def load_ids(mat_path: str) -> np.ndarray:
  """The (H, W) COCO-Stuff id map stored under "S" in a .mat file; ValueError naming the file
  if it cannot be read or has no 2-D "S"."""
  import scipy.io  # pylint: disable=g-import-not-at-top  (only the converter needs scipy)
  try:
    mat = scipy.io.loadmat(mat_path)
  except (ValueError, NotImplementedError, OSError, TypeError) as e:
    raise ValueError(f"cannot read {mat_path}: {e}") from e
  if "S" not in mat:
    keys = ", ".join(k for k in mat if not k.startswith("__")) or "none"
    raise ValueError(f"{mat_path} has no label map \"S\" (keys: {keys})")
  ids = np.asarray(mat["S"])
  if ids.ndim != 2:
    raise ValueError(f"{mat_path}: \"S\" has shape {ids.shape}, expected (H, W)")
  return ids


def convert_one(image_path: str, mat_path: str, out_image: str, out_label: str,
                symlink: bool = False) -> np.ndarray:
  """Converts one example; returns the counts of raw ids 0..182 in its label map."""
  ids = load_ids(mat_path)
  try:
    labels = cocostuff_to_train_ids(ids)
  except ValueError as e:
    raise ValueError(f"{mat_path}: {e}") from e
  with Image.open(image_path) as img:
    width, height = img.size
  if ids.shape != (height, width):
    raise ValueError(f"{mat_path} is {ids.shape[1]}x{ids.shape[0]} (WxH) but image "
                     f"{image_path} is {width}x{height}")
  if os.path.lexists(out_image):
    os.remove(out_image)
  if symlink:
    os.symlink(os.path.abspath(image_path), out_image)
  else:
    shutil.copyfile(image_path, out_image)
  Image.fromarray(labels, mode="L").save(out_label)
  return np.bincount(ids.astype(np.int64).ravel(), minlength=MAX_ID + 1)


def convert(raw: str, out: str, symlink: bool = False, progress: bool = True) -> dict:
  """Converts the raw COCO-Stuff-10K release in `raw` to the mmseg layout under `out`.

  Checks that every listed image and .mat exists before writing anything. Returns a summary:
  dict(train=number, test=number, id_counts=(183,) pixel counts of the raw ids).
  """
  layout = ("{raw}/images/NAME.jpg, {raw}/annotations/NAME.mat (label map \"S\") and "
            "{raw}/imageLists/{train,test}.txt (the cocostuff-10k release)")
  for sub in ("images", "annotations", "imageLists"):
    if not os.path.isdir(os.path.join(raw, sub)):
      raise FileNotFoundError(f"missing directory {os.path.join(raw, sub)}; expected layout: "
                              f"{layout}")
  jobs, missing, counts = [], [], {}
  for split, folder in SPLITS.items():
    list_path = os.path.join(raw, "imageLists", split + ".txt")
    if not os.path.isfile(list_path):
      raise FileNotFoundError(f"missing file {list_path}; expected layout: {layout}")
    names = files.read_list(list_path)
    counts[split] = len(names)
    for name in names:
      image = os.path.join(raw, "images", name + ".jpg")
      mat = os.path.join(raw, "annotations", name + ".mat")
      missing += [p for p in (image, mat) if not os.path.isfile(p)]
      jobs.append((image, mat, os.path.join(out, "images", folder, name + ".jpg"),
                   os.path.join(out, "annotations", folder, name + LABEL_SUFFIX)))
  if missing:
    shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
    raise FileNotFoundError(f"{len(missing)} file(s) named in {raw}/imageLists do not exist: "
                            f"{shown}; expected layout: {layout}")

  for folder in SPLITS.values():
    os.makedirs(os.path.join(out, "images", folder), exist_ok=True)
    os.makedirs(os.path.join(out, "annotations", folder), exist_ok=True)
  os.makedirs(os.path.join(out, "imageLists"), exist_ok=True)
  for split in SPLITS:
    src = os.path.join(raw, "imageLists", split + ".txt")
    dst = os.path.join(out, "imageLists", split + ".txt")
    if not (os.path.exists(dst) and os.path.samefile(src, dst)):
      shutil.copyfile(src, dst)

  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  id_counts = np.zeros(MAX_ID + 1, np.int64)
  for job in tqdm(jobs, desc="COCO-Stuff-10K", unit="image", disable=not progress):
    id_counts += convert_one(*job, symlink=symlink)
  return dict(counts, id_counts=id_counts)


def summary_text(summary: dict, out: str) -> str:
  """One paragraph describing a `convert` result."""
  id_counts = summary["id_counts"]
  total = max(int(id_counts.sum()), 1)
  ignored = int(id_counts[0]) + int(id_counts[list(UNUSED_IDS)].sum())
  present = int((id_counts[list(USED_IDS)] > 0).sum())
  return (f"wrote {summary['train']} train + {summary['test']} test images to {out}/images/"
          f"{{train2014,test2014}} with labels in {out}/annotations/{{train2014,test2014}}/"
          f"*{LABEL_SUFFIX}; {present} of {len(USED_IDS)} classes occur; "
          f"{100.0 * ignored / total:.1f}% of {total} pixels unlabelled (255).\n"
          f"Train with config.dataset.name = 'coco_stuff10k', config.dataset.root = '{out}', "
          f"config.dataset.num_classes = {len(USED_IDS)}.")


def define_flags() -> None:
  """The converter's flags (`runtime.run` defines them: importing this module defines none)."""
  flags.DEFINE_bool("symlink", False, "Link the images instead of copying them.")
  flags.DEFINE_bool("quiet", False, "No progress bar.")


def main(argv: list[str]) -> None:
  """`python -m segvit_jax.data.coco_stuff RAW OUT`: converts the raw COCO-Stuff-10K release
  (images/*.jpg, annotations/*.mat, imageLists/{train,test}.txt) in RAW to the mmseg layout
  with *_labelTrainIds.png labels (0..170, 255 unlabelled) in OUT (config.dataset.root; may
  equal RAW)."""
  if len(argv) != 3:
    raise app.UsageError("expected RAW OUT: the unpacked cocostuff-10k release and the output "
                         "directory")
  raw, out = argv[1:]
  summary = convert(raw, out, symlink=flags.FLAGS.symlink, progress=not flags.FLAGS.quiet)
  print(summary_text(summary, out))


if __name__ == "__main__":
  sys.exit(runtime.run(main, define_flags=define_flags))
