"""COCO panoptic segmentation (133 classes: 80 things + 53 stuff; Mask2Former Sec. 4) for EoMT
(EoMT Sec. 4.1), in the layout of COCO's panoptic release (cocodataset/panopticapi).

Layout (root = the coco directory):
  root/{train2017,val2017}/NAME.jpg
  root/annotations/panoptic_{train,val}2017.json
  root/annotations/panoptic_{train,val}2017/NAME.png   segment id = R + 256 G + 256^2 B, 0 = void

Records: dict(image=uint8 (H, W, 3), masks=bool (N, H, W), class_ids=int32 (N,),
is_thing=bool (N,), is_crowd=bool (N,), name=str), one entry per segment in the json's
`segments_info` order. Sparse COCO category ids (1..200) become contiguous ids 0..K-1 in the
order of the json's `categories` list (the official file lists the 80 things, then the 53 stuff
classes). Crowd segments
(`iscrowd` 1) are dropped with `drop_crowd=True` (the default, as in Mask2Former / EoMT training);
`drop_crowd=False` keeps them as segments flagged `is_crowd` (detectron2's panoptic -> semantic
conversion labels crowd pixels with their class; panoptic evaluation needs them to ignore
predictions on crowd regions, as COCO's panopticapi does).

Training (`segvit_jax.data.pipeline`) turns records into a segment-index map plus per-segment
classes (`transforms.segment_map`); `CocoPanoptic.check_max_segments` checks the json up front
against `config.dataset.max_segments`.

Layout problems (missing json, image or png, an annotation naming an unknown category) raise in
`coco_panoptic_source`, naming the file; a segment id absent from its png raises ValueError on
access, naming the png.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from PIL import Image

from segvit_jax.data import files

COCO_PANOPTIC_SPLITS = {"train": "train2017", "val": "val2017", "train2017": "train2017",
                        "val2017": "val2017"}
LAYOUT = ("{root}/{train2017,val2017}/*.jpg, {root}/annotations/panoptic_{train,val}2017.json and "
          "{root}/annotations/panoptic_{train,val}2017/*.png with root the coco directory")


# ----------------------------------------------------------------------------------------------
# Pure helpers.


def rgb_to_id(png: np.ndarray) -> np.ndarray:
  """Panoptic PNG (H, W, 3) uint8 -> segment ids (H, W) int32: R + 256 G + 256^2 B."""
  png = png.astype(np.int32)
  return png[..., 0] + 256 * png[..., 1] + 256 * 256 * png[..., 2]


def semantic_label(record: dict, ignore_index: int = 255) -> np.ndarray:
  """(H, W) uint8 class id per pixel from a record's masks, ignore_index where no segment."""
  masks, class_ids = record["masks"], record["class_ids"]
  label = np.full(masks.shape[1:], ignore_index, np.uint8)
  for mask, class_id in zip(masks, class_ids):
    label[mask] = class_id
  return label


@dataclasses.dataclass(frozen=True)
class Categories:
  """The json's `categories` list: contiguous id i <-> sparse COCO id `coco_ids[i]`."""
  coco_ids: tuple[int, ...]
  names: tuple[str, ...]
  is_thing: tuple[bool, ...]

  @property
  def contiguous(self) -> dict[int, int]:
    return {coco_id: i for i, coco_id in enumerate(self.coco_ids)}

  @property
  def thing_classes(self) -> tuple[str, ...]:
    return tuple(n for n, t in zip(self.names, self.is_thing) if t)

  def as_json(self) -> list[dict]:
    """[{id, name, isthing}] in class order: what bundles record for panoptic output."""
    return [{"id": i, "name": n, "isthing": int(t)}
            for i, n, t in zip(self.coco_ids, self.names, self.is_thing)]


def parse_categories(categories: list[dict], json_path: str) -> Categories:
  """`Categories` from the json's list; ValueError naming the json on a duplicate id."""
  coco_ids = tuple(int(c["id"]) for c in categories)
  if len(set(coco_ids)) != len(coco_ids):
    raise ValueError(f"{json_path} lists a category id more than once: {coco_ids}")
  return Categories(coco_ids, tuple(str(c["name"]) for c in categories),
                    tuple(bool(c.get("isthing", 0)) for c in categories))


@dataclasses.dataclass(frozen=True)
class Example:
  """One image: its files and kept segments (segment id, contiguous class id, is_thing)."""
  image_path: str
  png_path: str
  segment_ids: tuple[int, ...]
  class_ids: tuple[int, ...]
  is_thing: tuple[bool, ...]
  is_crowd: tuple[bool, ...] = ()  # empty: none is


def parse_annotation(annotation: dict, image_file: str, categories: Categories, image_dir: str,
                     png_dir: str, json_path: str, drop_crowd: bool = True) -> Example:
  """An `Example` from one json annotation; ValueError naming the json on an unknown category."""
  png_name = annotation["file_name"]
  contiguous = categories.contiguous
  segment_ids, class_ids, is_thing, is_crowd = [], [], [], []
  for segment in annotation["segments_info"]:
    coco_id = int(segment["category_id"])
    if coco_id not in contiguous:
      raise ValueError(f"{json_path}: segment {segment['id']} of {png_name} has category_id "
                       f"{coco_id}, which is not in the json's categories")
    if drop_crowd and segment.get("iscrowd", 0):
      continue
    segment_ids.append(int(segment["id"]))
    class_ids.append(contiguous[coco_id])
    is_thing.append(categories.is_thing[contiguous[coco_id]])
    is_crowd.append(bool(segment.get("iscrowd", 0)))
  return Example(os.path.join(image_dir, image_file), os.path.join(png_dir, png_name),
                 tuple(segment_ids), tuple(class_ids), tuple(is_thing), tuple(is_crowd))


# ----------------------------------------------------------------------------------------------
# Source.


def read_panoptic_png(path: str) -> np.ndarray:
  """Segment ids (H, W) int32 of a panoptic PNG; ValueError naming the file if unreadable."""
  try:
    with Image.open(path) as img:
      if img.mode != "RGB":
        raise ValueError(f"expected an RGB panoptic PNG, got mode {img.mode}")
      return rgb_to_id(np.asarray(img))
  except (OSError, ValueError, SyntaxError) as e:
    raise ValueError(f"cannot decode panoptic png {path}: {e}") from e


class CocoPanoptic:
  """grain RandomAccessDataSource of COCO panoptic records (see the module docstring).

  `class_names` (contiguous order), `thing_classes` (names of the thing classes) and
  `is_thing_class` (per contiguous id) come from the json's categories.
  """

  def __init__(self, examples: list[Example], categories: Categories, json_path: str):
    self.examples = list(examples)
    self.categories = categories
    self.json_path = json_path
    self.class_names = categories.names
    self.thing_classes = categories.thing_classes
    self.is_thing_class = categories.is_thing

  def __len__(self) -> int:
    return len(self.examples)

  def __getitem__(self, index: int) -> dict:
    ex = self.examples[int(index)]
    image = files.read_image(ex.image_path)
    ids = read_panoptic_png(ex.png_path)
    if ids.shape != image.shape[:2]:
      raise ValueError(f"panoptic png {ex.png_path} is {ids.shape[1]}x{ids.shape[0]} (WxH) but "
                       f"image {ex.image_path} is {image.shape[1]}x{image.shape[0]}")
    segment_ids = np.asarray(ex.segment_ids, np.int32)
    masks = ids[None] == segment_ids[:, None, None]
    empty = ~masks.any(axis=(1, 2))
    if empty.any():
      missing = ", ".join(str(int(s)) for s in segment_ids[empty][:10])
      raise ValueError(f"segment id(s) {missing} listed in {self.json_path} do not occur in "
                       f"panoptic png {ex.png_path}")
    return dict(image=image, masks=masks, class_ids=np.asarray(ex.class_ids, np.int32),
                is_thing=np.asarray(ex.is_thing, bool),
                is_crowd=np.asarray(ex.is_crowd or (False,) * len(segment_ids), bool),
                name=os.path.splitext(os.path.basename(ex.image_path))[0])

  def check_max_segments(self, max_segments: int) -> None:
    """ValueError naming the png (and the json) of the image with the most kept segments if it
    has more than `max_segments`: the training batch holds `max_segments` per image. From the
    json alone, so a run fails before reading any image."""
    kept = [len(ex.segment_ids) - sum(ex.is_crowd) for ex in self.examples]
    most = int(np.argmax(kept))
    if kept[most] > max_segments:
      over = sum(n > max_segments for n in kept)
      raise ValueError(f"panoptic png {self.examples[most].png_path} has {kept[most]} segments "
                       f"(crowd dropped) in {self.json_path}, more than config.dataset."
                       f"max_segments={max_segments} ({over} image(s) do); raise it to at "
                       f"least {kept[most]}")

  def __repr__(self) -> str:
    return f"CocoPanoptic({len(self)} images, {len(self.class_names)} classes)"


def _require(path: str, is_dir: bool) -> None:
  if not (os.path.isdir(path) if is_dir else os.path.isfile(path)):
    kind = "directory" if is_dir else "file"
    raise FileNotFoundError(f"missing {kind} {path}; expected layout: {LAYOUT}. Point "
                            "--config.dataset.root at the coco directory.")


def coco_panoptic_source(root: str, split: str, drop_crowd: bool = True) -> CocoPanoptic:
  """COCO panoptic for split ("train" / "val" or "train2017" / "val2017")."""
  if split not in COCO_PANOPTIC_SPLITS:
    raise ValueError(f"unknown COCO panoptic split {split!r}; known: "
                     f"{sorted(COCO_PANOPTIC_SPLITS)}")
  folder = COCO_PANOPTIC_SPLITS[split]
  _require(root, is_dir=True)
  json_path = os.path.join(root, "annotations", f"panoptic_{folder}.json")
  image_dir = os.path.join(root, folder)
  png_dir = os.path.join(root, "annotations", f"panoptic_{folder}")
  _require(json_path, is_dir=False)
  _require(image_dir, is_dir=True)
  _require(png_dir, is_dir=True)
  try:
    with open(json_path, encoding="utf-8") as f:
      data = json.load(f)
    categories = parse_categories(data["categories"], json_path)
    image_files = {image["id"]: image["file_name"] for image in data["images"]}
    examples = []
    for a in data["annotations"]:
      if a["image_id"] not in image_files:
        raise ValueError(f"{json_path}: annotation {a['file_name']} names image_id "
                         f"{a['image_id']!r}, which is not in the json's images")
      examples.append(parse_annotation(a, image_files[a["image_id"]], categories, image_dir,
                                       png_dir, json_path, drop_crowd))
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise ValueError(f"cannot read COCO panoptic json {json_path}: {e!r}") from e
  if not examples:
    raise FileNotFoundError(f"{json_path} has no annotations; expected layout: {LAYOUT}")
  examples.sort(key=lambda ex: ex.image_path)
  for directory, paths in ((image_dir, [ex.image_path for ex in examples]),
                           (png_dir, [ex.png_path for ex in examples])):
    present = set(os.listdir(directory))
    missing = [p for p in paths if os.path.basename(p) not in present]
    if missing:
      raise FileNotFoundError(f"{len(missing)} file(s) named by {json_path} are missing from "
                              f"{directory}, e.g. {missing[0]}; expected layout: {LAYOUT}")
  return CocoPanoptic(examples, categories, json_path)


def build(dataset_cfg, split: str) -> CocoPanoptic:
  """The "coco_panoptic" source of `config.dataset` (root, drop_crowd)."""
  root = files.dataset_root(dataset_cfg, f"the coco directory ({LAYOUT})")
  return coco_panoptic_source(root, split, dataset_cfg.drop_crowd)


# Dataset names whose records are panoptic (masks + class_ids, no label map): training turns
# them into segment-index maps (`segvit_jax.data.pipeline`, `transforms.segment_map`). COCO
# instances (`coco_instance.py`) have records of the same form.
PANOPTIC_DATASETS = frozenset({"coco_panoptic", "coco_instance"})
