"""ADE20K panoptic segmentation (150 classes: 100 things + 50 stuff; Mask2Former Sec. 4) for EoMT
(the EoMT release's ADE20K panoptic configs), in either of the two layouts its users have.

root = the ADEChallengeData2016 directory, holding images/{training,validation}/*.jpg, and
  1. Mask2Former's panoptic files (its datasets/prepare_ade20k_pan_seg.py writes them, in COCO's
     panoptic format; read through `coco_panoptic.panoptic_source` with `JSON_LAYOUT`):
       root/ade20k_panoptic_{train,val}.json
       root/ade20k_panoptic_{train,val}/NAME.png   segment id = R + 256 G + 256^2 B, 0 = void
  2. or, where that json is absent, the two annotation sets the EoMT release reads (its
     datasets/ade20k_panoptic.py, from ADEChallengeData2016.zip and annotations_instance.zip):
       root/annotations/{training,validation}/NAME.png   8-bit class 1..150, 0 = other
       annotations_instance/{training,validation}/NAME.png   R = instance category 1..100,
         G = instance id (0 = none), either inside root (Mask2Former's datasets/README.md) or
         beside it (the release's two archives unpacked in one directory).

Both give the same records, those of `coco_panoptic` (masks, class_ids 0..149, is_thing,
is_crowd all False, name), segments in the order Mask2Former's converter writes them: a stuff
segment per stuff class present in the semantic png (ascending class), then a thing segment per
instance id of the instance png (ascending id), its class the instance category mapped to the
150 (`INSTANCE_TO_CLASS`, the release's INSTANCE_MAPPING = Mask2Former's
ade20k_instance_catid_mapping.txt). Things are painted over stuff as Mask2Former does (the two
annotations overlap a little): stuff masks lose the pixels of instances, and a stuff segment
left with no pixel is dropped. Pixels of thing classes without an instance, and "other", are
void. Every image is kept, one without segments too (as Mask2Former; the release's
`check_empty_targets` leaves those out).

Layout problems raise when the source is built (FileNotFoundError naming the missing file or
directory and both layouts); an instance spanning two categories or an unknown category raises
ValueError naming its png on access.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from segvit_jax.data import ade20k, coco_panoptic, files

# The ADE20K instance challenge's 100 categories (1..100 in the R channel) -> the 150 classes
# (0..149): the EoMT release's INSTANCE_MAPPING (datasets/ade20k_panoptic.py), the same as
# Mask2Former's datasets/ade20k_instance_catid_mapping.txt. These are the thing classes.
INSTANCE_TO_CLASS = (
    7, 8, 10, 12, 14, 15, 18, 19, 20, 22, 23, 24, 27, 30, 31, 32, 33, 35, 36, 37, 38, 39, 41,
    42, 43, 44, 45, 47, 49, 50, 53, 55, 56, 57, 58, 62, 64, 65, 66, 67, 69, 70, 71, 72, 73, 74,
    75, 76, 78, 80, 81, 82, 83, 85, 86, 87, 88, 89, 90, 92, 93, 95, 97, 98, 102, 103, 104, 107,
    108, 110, 111, 112, 115, 116, 118, 119, 120, 121, 123, 124, 125, 126, 127, 129, 130, 132,
    133, 134, 135, 136, 137, 138, 139, 142, 143, 144, 146, 147, 148, 149,
)
assert len(INSTANCE_TO_CLASS) == len(set(INSTANCE_TO_CLASS)) == 100
# The 50 others are stuff: the release's `stuff_classes` of configs/dinov2/ade20k/panoptic/*.yaml.
STUFF_CLASSES = tuple(k for k in range(150) if k not in set(INSTANCE_TO_CLASS))

# Ids 0..149 (Mask2Former's json lists these), the mmseg class names, things flagged.
CATEGORIES = coco_panoptic.Categories(
    tuple(range(150)), ade20k.ADE20K_CLASSES,
    tuple(k in set(INSTANCE_TO_CLASS) for k in range(150)))

ADE20K_PANOPTIC_SPLITS = {"train": ("training", "train"), "val": ("validation", "val"),
                          "training": ("training", "train"), "validation": ("validation", "val")}
DESCRIBE = ("root = ADEChallengeData2016 with images/{training,validation}/*.jpg and either "
            "Mask2Former's ade20k_panoptic_{train,val}.json + ade20k_panoptic_{train,val}/*.png "
            "or the EoMT release's annotations/{training,validation}/*.png + "
            "annotations_instance/{training,validation}/*.png (inside root or beside it)")
ROOT_IS = "the ADEChallengeData2016 directory"

JSON_LAYOUT = coco_panoptic.Layout(
    title="ADE20K panoptic",
    splits={s: (f"images/{folder}", f"ade20k_panoptic_{short}.json", f"ade20k_panoptic_{short}")
            for s, (folder, short) in ADE20K_PANOPTIC_SPLITS.items()},
    describe=DESCRIBE, root_is=ROOT_IS, categories=CATEGORIES, drop_absent_segments=True)


def panoptic_from_annotations(semantic: np.ndarray, instance: np.ndarray, name: str = ""
                              ) -> tuple[np.ndarray, np.ndarray]:
  """(masks (N, H, W) bool, class_ids (N,) int32) from a semantic png (H, W) (1..150, 0 other)
  and an instance png (H, W, 3) (R category 1..100, G instance id), as the module docstring
  says. ValueError naming `name` (the instance png) for an instance whose pixels carry more than
  one category or a category outside 1..100."""
  categories, instance_ids = instance[..., 0].astype(np.int32), instance[..., 1]
  thing_masks, thing_classes = [], []
  for instance_id in np.unique(instance_ids):
    if instance_id == 0:
      continue
    mask = instance_ids == instance_id
    category = np.unique(categories[mask])
    if len(category) != 1 or not 1 <= category[0] <= len(INSTANCE_TO_CLASS):
      raise ValueError(f"instance {int(instance_id)} of {name or 'an instance png'} has "
                       f"category(ies) {', '.join(map(str, category[:10]))} in its R channel; "
                       f"expected one of 1..{len(INSTANCE_TO_CLASS)}")
    thing_masks.append(mask)
    thing_classes.append(INSTANCE_TO_CLASS[category[0] - 1])
  things = np.any(thing_masks, axis=0) if thing_masks else np.zeros(semantic.shape, bool)
  stuff_masks, stuff_classes = [], []
  stuff = set(STUFF_CLASSES)
  for value in np.unique(semantic):
    if 1 <= value <= 150 and int(value) - 1 in stuff:
      mask = (semantic == value) & ~things
      if mask.any():
        stuff_masks.append(mask)
        stuff_classes.append(int(value) - 1)
  masks = stuff_masks + thing_masks
  return (np.stack(masks) if masks else np.zeros((0,) + semantic.shape, bool),
          np.asarray(stuff_classes + thing_classes, np.int32))


def read_instance_png(path: str) -> np.ndarray:
  """An instance png as (H, W, 3) uint8; ValueError naming the file if it is not 8-bit RGB."""
  try:
    with Image.open(path) as img:
      if img.mode != "RGB":
        raise ValueError(f"expected an RGB instance png (R category, G instance id), got mode "
                         f"{img.mode}")
      return np.asarray(img)
  except (OSError, ValueError, SyntaxError) as e:
    raise ValueError(f"cannot decode instance png {path}: {e}") from e


class Ade20kPanopticPngs:
  """grain RandomAccessDataSource of ADE20K panoptic records from the semantic and instance
  pngs (layout 2 of the module docstring); `pairs` are (image, semantic png) paths, so messages
  name the image. A semantic value above 150 raises ValueError naming the png on access."""

  def __init__(self, pairs: list[tuple[str, str]], instance_pngs: list[str]):
    self.pairs = list(pairs)
    self.instance_pngs = list(instance_pngs)
    self.categories = CATEGORIES
    self.class_names = CATEGORIES.names
    self.thing_classes = CATEGORIES.thing_classes
    self.is_thing_class = CATEGORIES.is_thing

  def __len__(self) -> int:
    return len(self.pairs)

  def __getitem__(self, index: int) -> dict:
    image_path, semantic_path = self.pairs[int(index)]
    instance_path = self.instance_pngs[int(index)]
    image = files.read_image(image_path)
    semantic = files.read_label(semantic_path)
    if semantic.max(initial=0) > len(CATEGORIES.names):
      bad = np.unique(semantic[semantic > len(CATEGORIES.names)])[:10]
      raise ValueError(f"semantic png {semantic_path} has value(s) {', '.join(map(str, bad))}; "
                       f"expected 0 (other) and 1..{len(CATEGORIES.names)}")
    instance = read_instance_png(instance_path)
    for path, shape in ((semantic_path, semantic.shape), (instance_path, instance.shape[:2])):
      if shape != image.shape[:2]:
        raise ValueError(f"{path} is {shape[1]}x{shape[0]} (WxH) but image {image_path} is "
                         f"{image.shape[1]}x{image.shape[0]}")
    masks, class_ids = panoptic_from_annotations(semantic, instance, instance_path)
    is_thing = np.asarray(CATEGORIES.is_thing, bool)[class_ids]
    return dict(image=image, masks=masks, class_ids=class_ids, is_thing=is_thing,
                is_crowd=np.zeros(len(class_ids), bool),
                name=os.path.splitext(os.path.basename(image_path))[0])

  def __repr__(self) -> str:
    return f"Ade20kPanopticPngs({len(self)} images, {len(self.class_names)} classes)"


def ade20k_panoptic_source(root: str, split: str, drop_crowd: bool = True):
  """ADE20K panoptic for split ("train" / "val" or "training" / "validation"); root is the
  ADEChallengeData2016 directory. Mask2Former's json where it exists, else the semantic +
  instance pngs. ADE20K has no crowd segments (`drop_crowd` changes nothing)."""
  if split not in ADE20K_PANOPTIC_SPLITS:
    raise ValueError(f"unknown ADE20K panoptic split {split!r}; known: "
                     f"{sorted(ADE20K_PANOPTIC_SPLITS)}")
  files.require_dir(root, DESCRIBE)
  if os.path.isfile(os.path.join(root, JSON_LAYOUT.splits[split][1])):
    return coco_panoptic.panoptic_source(root, split, JSON_LAYOUT, drop_crowd)
  folder, _ = ADE20K_PANOPTIC_SPLITS[split]
  candidates = [os.path.join(root, "annotations_instance", folder),
                os.path.join(os.path.dirname(os.path.abspath(root)), "annotations_instance",
                             folder)]
  instance_dir = next((d for d in candidates if os.path.isdir(d)), None)
  if instance_dir is None:
    raise FileNotFoundError(
        f"found neither {os.path.join(root, JSON_LAYOUT.splits[split][1])} nor an instance "
        f"annotation directory ({' or '.join(candidates)}); expected layout: {DESCRIBE}. Point "
        f"--config.dataset.root at {ROOT_IS}.")
  pairs = files.paired_files(os.path.join(root, "images", folder),
                             os.path.join(root, "annotations", folder), DESCRIBE)
  instance_pngs = [os.path.join(instance_dir, os.path.basename(label)) for _, label in pairs]
  present = set(os.listdir(instance_dir))
  missing = [p for p in instance_pngs if os.path.basename(p) not in present]
  if missing:
    raise FileNotFoundError(f"{len(missing)} image(s) of {os.path.join(root, 'images', folder)} "
                            f"have no instance png in {instance_dir}, e.g. {missing[0]}; "
                            f"expected layout: {DESCRIBE}")
  return Ade20kPanopticPngs(pairs, instance_pngs)


def build(dataset_cfg, split: str):
  """The "ade20k_panoptic" source of `config.dataset` (root)."""
  root = files.dataset_root(dataset_cfg, f"{ROOT_IS} ({DESCRIBE})")
  return ade20k_panoptic_source(root, split, dataset_cfg.drop_crowd)
