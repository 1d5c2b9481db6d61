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

Other datasets stored in this format (ADE20K panoptic as Mask2Former writes it,
`ade20k_panoptic.py`) are read by the same `panoptic_source` with their own `Layout` (split ->
image folder, json, png folder; fixed categories).

Layout problems (missing json, image or png, an annotation naming an unknown category) raise in
`panoptic_source` / `coco_panoptic_source`, naming the file; a segment id absent from its png
raises ValueError on access, naming the png.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from PIL import Image

from segvit_jax.data import files


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
# Layouts: where a dataset in COCO's panoptic format keeps each split.


@dataclasses.dataclass(frozen=True)
class Layout:
  """A dataset stored in COCO's panoptic format (a json of images / annotations / segments_info
  / categories and one RGB png per image): split name -> (image folder, json, png folder),
  relative to `config.dataset.root`.

  `title` and `describe` (the layout in one line) name it in messages; `root_is` says what the
  root is. `categories`, where the dataset fixes them: the json must list exactly these ids and
  thing flags, and the records use these names (else the json's categories as they are).
  `drop_absent_segments`: a listed segment with no pixel in its png is dropped (for converters
  that paint one segment over another, as Mask2Former's ADE20K one) instead of raising.
  """
  title: str
  splits: dict[str, tuple[str, str, str]]
  describe: str
  root_is: str
  categories: Categories | None = None
  drop_absent_segments: bool = False


COCO_LAYOUT = Layout(
    title="COCO panoptic",
    splits={s: (f, f"annotations/panoptic_{f}.json", f"annotations/panoptic_{f}")
            for s, f in (("train", "train2017"), ("val", "val2017"), ("train2017", "train2017"),
                         ("val2017", "val2017"))},
    describe=("{root}/{train2017,val2017}/*.jpg, {root}/annotations/panoptic_{train,val}2017.json "
              "and {root}/annotations/panoptic_{train,val}2017/*.png with root the coco "
              "directory"),
    root_is="the coco directory")
LAYOUT = COCO_LAYOUT.describe


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
  """grain RandomAccessDataSource of panoptic records (see the module docstring) read from a
  dataset in COCO's panoptic format (COCO's, or another `Layout`'s).

  `class_names` (contiguous order), `thing_classes` (names of the thing classes) and
  `is_thing_class` (per contiguous id) come from the categories. With `drop_absent_segments`, a
  segment the json lists but its png lacks is left out of the record instead of raising.
  """

  def __init__(self, examples: list[Example], categories: Categories, json_path: str,
               drop_absent_segments: bool = False):
    self.examples = list(examples)
    self.categories = categories
    self.json_path = json_path
    self.drop_absent_segments = drop_absent_segments
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
    class_ids = np.asarray(ex.class_ids, np.int32)
    is_thing = np.asarray(ex.is_thing, bool)
    is_crowd = np.asarray(ex.is_crowd or (False,) * len(segment_ids), bool)
    empty = ~masks.any(axis=(1, 2))
    if empty.any() and self.drop_absent_segments:
      keep = ~empty
      masks, class_ids, is_thing, is_crowd = (masks[keep], class_ids[keep], is_thing[keep],
                                              is_crowd[keep])
    elif empty.any():
      missing = ", ".join(str(int(s)) for s in segment_ids[empty][:10])
      raise ValueError(f"segment id(s) {missing} listed in {self.json_path} do not occur in "
                       f"panoptic png {ex.png_path}")
    return dict(image=image, masks=masks, class_ids=class_ids, is_thing=is_thing,
                is_crowd=is_crowd, name=os.path.splitext(os.path.basename(ex.image_path))[0])

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


def _require(path: str, is_dir: bool, layout: Layout) -> None:
  if not (os.path.isdir(path) if is_dir else os.path.isfile(path)):
    kind = "directory" if is_dir else "file"
    raise FileNotFoundError(f"missing {kind} {path}; expected layout: {layout.describe}. Point "
                            f"--config.dataset.root at {layout.root_is}.")


def _fixed_categories(parsed: Categories, layout: Layout, json_path: str) -> Categories:
  """`layout.categories` if the json lists its ids and thing flags, else ValueError."""
  want = layout.categories
  if (parsed.coco_ids, parsed.is_thing) != (want.coco_ids, want.is_thing):
    raise ValueError(f"{json_path} lists {len(parsed.coco_ids)} categories (ids "
                     f"{_short(parsed.coco_ids)}, thing ids {_short(_things(parsed))}); "
                     f"{layout.title} has {len(want.coco_ids)} (ids {_short(want.coco_ids)}, "
                     f"thing ids {_short(_things(want))}); expected layout: {layout.describe}")
  return want


def _things(categories: Categories) -> tuple[int, ...]:
  return tuple(i for i, t in zip(categories.coco_ids, categories.is_thing) if t)


def _short(ids: tuple[int, ...]) -> str:
  return ", ".join(map(str, ids[:8])) + (", ..." if len(ids) > 8 else "")


def panoptic_source(root: str, split: str, layout: Layout = COCO_LAYOUT,
                    drop_crowd: bool = True) -> CocoPanoptic:
  """The records of `split` of a dataset in COCO's panoptic format laid out as `layout`."""
  if split not in layout.splits:
    raise ValueError(f"unknown {layout.title} split {split!r}; known: {sorted(layout.splits)}")
  image_folder, json_file, png_folder = layout.splits[split]
  _require(root, True, layout)
  json_path = os.path.join(root, json_file)
  image_dir = os.path.join(root, image_folder)
  png_dir = os.path.join(root, png_folder)
  _require(json_path, False, layout)
  _require(image_dir, True, layout)
  _require(png_dir, True, layout)
  try:
    with open(json_path, encoding="utf-8") as f:
      data = json.load(f)
    categories = parse_categories(data["categories"], json_path)
    if layout.categories is not None:
      categories = _fixed_categories(categories, layout, json_path)
    image_files = {image["id"]: image["file_name"] for image in data["images"]}
    examples = []
    for a in data["annotations"]:
      if a["image_id"] not in image_files:
        raise ValueError(f"{json_path}: annotation {a['file_name']} names image_id "
                         f"{a['image_id']!r}, which is not in the json's images")
      examples.append(parse_annotation(a, image_files[a["image_id"]], categories, image_dir,
                                       png_dir, json_path, drop_crowd))
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise ValueError(f"cannot read {layout.title} json {json_path}: {e!r}") from e
  if not examples:
    raise FileNotFoundError(f"{json_path} has no annotations; expected layout: "
                            f"{layout.describe}")
  examples.sort(key=lambda ex: ex.image_path)
  for directory, paths in ((image_dir, [ex.image_path for ex in examples]),
                           (png_dir, [ex.png_path for ex in examples])):
    present = set(os.listdir(directory))
    missing = [p for p in paths if os.path.basename(p) not in present]
    if missing:
      raise FileNotFoundError(f"{len(missing)} file(s) named by {json_path} are missing from "
                              f"{directory}, e.g. {missing[0]}; expected layout: "
                              f"{layout.describe}")
  return CocoPanoptic(examples, categories, json_path, layout.drop_absent_segments)


def coco_panoptic_source(root: str, split: str, drop_crowd: bool = True) -> CocoPanoptic:
  """COCO panoptic for split ("train" / "val" or "train2017" / "val2017")."""
  return panoptic_source(root, split, COCO_LAYOUT, drop_crowd)


def build(dataset_cfg, split: str) -> CocoPanoptic:
  """The "coco_panoptic" source of `config.dataset` (root, drop_crowd)."""
  root = files.dataset_root(dataset_cfg, f"the coco directory ({LAYOUT})")
  return coco_panoptic_source(root, split, dataset_cfg.drop_crowd)


# Dataset names whose records are panoptic (masks + class_ids, no label map): training turns
# them into segment-index maps (`segvit_jax.data.pipeline`, `transforms.segment_map`). COCO
# instances (`coco_instance.py`) have records of the same form.
PANOPTIC_DATASETS = frozenset({"coco_panoptic", "ade20k_panoptic", "coco_instance"})
