"""COCO instance segmentation (80 thing classes; Mask2Former Sec. 4, EoMT Sec. 4.1 and the EoMT
release's COCO instance configs), in the layout of COCO's 2017 detection release.

Layout (root = the coco directory):
  root/{train2017,val2017}/NAME.jpg
  root/annotations/instances_{train,val}2017.json

Records: dict(image=uint8 (H, W, 3), masks=bool (N, H, W), class_ids=int32 (N,),
is_thing=bool (N,) all True, is_crowd=bool (N,), area=float32 (N,) the json's `area`, name=str),
one entry per annotation in the json's order, as `coco_panoptic`'s records. Unlike panoptic
segments, instance masks may overlap (the source's `masks_overlap` is True): training stacks
them in segment-index layers (`transforms.segment_map`, `config.dataset.mask_layers`) and
evaluation keeps them as a mask stack (`pipeline.PanopticEvalTarget`). Sparse COCO category ids
(1..90) become contiguous ids 0..79 in the order of the json's `categories` list (the EoMT
release's `CLASS_MAPPING`). Crowd annotations (`iscrowd` 1) are dropped with `drop_crowd=True`
(training) and kept flagged with `drop_crowd=False` (evaluation: COCOeval ignores detections
matched to them). Images without any annotation are left out, as the EoMT release's dataset
does (for val2017: 48 of the 5000 images).

Masks are decoded as pycocotools' `COCO.annToMask` does (the rasterisation COCOeval and the
release use): polygons rasterised (`frPyObjects`) and merged, uncompressed RLE (`counts` a
list, COCO's crowd annotations) encoded, compressed RLE (`counts` a string) decoded as it is.
Polygons with fewer than 3 points (under 6 numbers) are skipped: pycocotools would read a
4-number one as a box.

The json is parsed once; each image keeps its annotations' segmentations as one json string
(decoded on access), so the source stays about the size of the json file and cheap to hand
to grain worker processes. Layout problems (missing json or image folder, an annotation naming
an unknown category or image, an RLE of another size) raise in `coco_instance_source`, naming
the file; an image whose size is not the json's raises ValueError on access, naming both.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings

import numpy as np

from segvit_jax.data import coco_panoptic, files

COCO_INSTANCE_SPLITS = {"train": "train2017", "val": "val2017", "train2017": "train2017",
                        "val2017": "val2017"}
LAYOUT = ("{root}/{train2017,val2017}/*.jpg and {root}/annotations/instances_{train,val}2017.json"
          " with root the coco directory")


# ----------------------------------------------------------------------------------------------
# Pure helpers.


def annotation_mask(segmentation, height: int, width: int, where: str = "") -> np.ndarray:
  """(height, width) bool mask of one COCO `segmentation`: a list of polygons [x0, y0, x1, y1,
  ...] (pixel coordinates; merged), an uncompressed RLE {size, counts: [int]} or a compressed
  one {size, counts: str} (column-major runs starting with 0s). ValueError naming `where` for
  anything else or an RLE whose size is not (height, width)."""
  from pycocotools import mask as mask_util  # pylint: disable=g-import-not-at-top
  if isinstance(segmentation, list):
    polygons = [[float(v) for v in p] for p in segmentation if len(p) >= 6]
    if not polygons:
      return np.zeros((height, width), bool)
    rle = mask_util.merge(mask_util.frPyObjects(polygons, height, width))
  elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
    if [int(v) for v in segmentation["size"]] != [height, width]:
      raise ValueError(f"{where}: RLE size {segmentation['size']} is not the image's "
                       f"[{height}, {width}]")
    counts = segmentation["counts"]
    if isinstance(counts, list):
      if sum(int(c) for c in counts) != height * width:
        raise ValueError(f"{where}: uncompressed RLE counts sum to {sum(counts)}, not "
                         f"{height} x {width} = {height * width}")
      rle = mask_util.frPyObjects(segmentation, height, width)
    else:
      rle = {"size": [height, width],
             "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
  else:
    raise ValueError(f"{where}: segmentation is neither polygons nor an RLE: "
                     f"{str(segmentation)[:80]}")
  with warnings.catch_warnings():  # pycocotools' own numpy 2 `copy=` deprecation, not ours
    warnings.simplefilter("ignore", DeprecationWarning)
    return mask_util.decode(rle).astype(bool)


def parse_categories(categories: list[dict], json_path: str) -> coco_panoptic.Categories:
  """The json's `categories` in order, every one a thing class; ValueError on a duplicate id."""
  parsed = coco_panoptic.parse_categories(categories, json_path)
  return dataclasses.replace(parsed, is_thing=(True,) * len(parsed.coco_ids))


@dataclasses.dataclass(frozen=True)
class Example:
  """One image: its file, size, and kept annotations (contiguous class id, crowd flag, json
  area) with their segmentations as one json string (a list, in the same order)."""
  image_path: str
  height: int
  width: int
  class_ids: tuple[int, ...]
  is_crowd: tuple[bool, ...]
  areas: tuple[float, ...]
  segmentations: str


# ----------------------------------------------------------------------------------------------
# Source.


class CocoInstance:
  """grain RandomAccessDataSource of COCO instance records (see the module docstring), with
  `class_names`, `thing_classes`, `is_thing_class` and `categories` as `CocoPanoptic`."""

  masks_overlap = True  # instance masks may overlap (evaluation keeps a mask stack)

  def __init__(self, examples: list[Example], categories: coco_panoptic.Categories,
               json_path: str):
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
    if image.shape[:2] != (ex.height, ex.width):
      raise ValueError(f"image {ex.image_path} is {image.shape[1]}x{image.shape[0]} (WxH) but "
                       f"{self.json_path} says {ex.width}x{ex.height}")
    where = f"{self.json_path} ({os.path.basename(ex.image_path)})"
    segmentations = json.loads(ex.segmentations)
    masks = np.zeros((len(segmentations), ex.height, ex.width), bool)
    for i, segmentation in enumerate(segmentations):
      masks[i] = annotation_mask(segmentation, ex.height, ex.width, where)
    n = len(segmentations)
    return dict(image=image, masks=masks, class_ids=np.asarray(ex.class_ids, np.int32),
                is_thing=np.ones(n, bool), is_crowd=np.asarray(ex.is_crowd, bool).reshape(n),
                area=np.asarray(ex.areas, np.float32).reshape(n),
                name=os.path.splitext(os.path.basename(ex.image_path))[0])

  def check_max_segments(self, max_segments: int) -> None:
    """ValueError naming the image (and the json) with the most non-crowd instances if it has
    more than `max_segments` (the training batch holds `max_segments` per image); from the
    json alone, before any image is read."""
    kept = [len(ex.class_ids) - sum(ex.is_crowd) for ex in self.examples]
    most = int(np.argmax(kept))
    if kept[most] > max_segments:
      over = sum(n > max_segments for n in kept)
      raise ValueError(f"image {self.examples[most].image_path} has {kept[most]} instances "
                       f"(crowd dropped) in {self.json_path}, more than config.dataset."
                       f"max_segments={max_segments} ({over} image(s) do); raise it to at "
                       f"least {kept[most]}")

  def __repr__(self) -> str:
    return f"CocoInstance({len(self)} images, {len(self.class_names)} classes)"


def coco_instance_source(root: str, split: str, drop_crowd: bool = True) -> CocoInstance:
  """COCO instances for split ("train" / "val" or "train2017" / "val2017")."""
  folder = files.split_name("COCO instance", split, COCO_INSTANCE_SPLITS)
  files.require_dir(root, LAYOUT)
  json_path = os.path.join(root, "annotations", f"instances_{folder}.json")
  image_dir = os.path.join(root, folder)
  files.require_file(json_path, LAYOUT)
  files.require_dir(image_dir, LAYOUT)
  try:
    with open(json_path, encoding="utf-8") as f:
      data = json.load(f)
    categories = parse_categories(data["categories"], json_path)
    contiguous = categories.contiguous
    images = {image["id"]: image for image in data["images"]}
    by_image: dict = {}
    for a in data["annotations"]:
      if a["image_id"] not in images:
        raise ValueError(f"{json_path}: annotation {a.get('id')} names image_id "
                         f"{a['image_id']!r}, which is not in the json's images")
      if int(a["category_id"]) not in contiguous:
        raise ValueError(f"{json_path}: annotation {a.get('id')} has category_id "
                         f"{a['category_id']}, which is not in the json's categories")
      by_image.setdefault(a["image_id"], []).append(a)
    examples = []
    for image_id, annotations in by_image.items():
      image = images[image_id]
      h, w = int(image["height"]), int(image["width"])
      kept = [a for a in annotations if not (drop_crowd and a.get("iscrowd", 0))]
      for a in kept:
        segmentation = a["segmentation"]
        if isinstance(segmentation, dict) and [int(v) for v in segmentation["size"]] != [h, w]:
          raise ValueError(f"{json_path}: annotation {a.get('id')} has an RLE of size "
                           f"{segmentation['size']}, but its image {image['file_name']} is "
                           f"[{h}, {w}] (height, width)")
      examples.append(Example(
          os.path.join(image_dir, image["file_name"]), h, w,
          tuple(contiguous[int(a["category_id"])] for a in kept),
          tuple(bool(a.get("iscrowd", 0)) for a in kept),
          tuple(float(a.get("area", 0.0)) for a in kept),
          json.dumps([a["segmentation"] for a in kept])))
  except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
    raise ValueError(f"cannot read COCO instances json {json_path}: {e!r}") from e
  if not examples:
    raise FileNotFoundError(f"{json_path} has no annotations; expected layout: {LAYOUT}")
  examples.sort(key=lambda ex: ex.image_path)
  present = set(os.listdir(image_dir))
  missing = [ex.image_path for ex in examples if os.path.basename(ex.image_path) not in present]
  if missing:
    raise FileNotFoundError(f"{len(missing)} image(s) named by {json_path} are missing from "
                            f"{image_dir}, e.g. {missing[0]}; expected layout: {LAYOUT}")
  return CocoInstance(examples, categories, json_path)


def build(dataset_cfg, split: str) -> CocoInstance:
  """The "coco_instance" source of `config.dataset` (root, drop_crowd)."""
  root = files.dataset_root(dataset_cfg, f"the coco directory ({LAYOUT})")
  return coco_instance_source(root, split, dataset_cfg.drop_crowd)
