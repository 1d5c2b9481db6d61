"""Miniature datasets in real on-disk layouts, made from the built-in synthetic scenes, for
tests that need a dataset the code reads from files.

`write_coco_panoptic(root, ...)`: root/{train2017,val2017}/*.jpg,
root/annotations/panoptic_{train,val}2017.json and .../panoptic_{split}/*.png (segment id =
R + 256 G + 256^2 B, 0 = void), as COCO's panoptic release. Categories: the five synthetic
shapes are "thing" classes (COCO ids 1..5), the background a "stuff" class (COCO id 200);
every shape is its own segment, the background one segment; optionally the last object of
some images is marked crowd.

`write_ade20k_panoptic(root, ...)`: ADEChallengeData2016 as the EoMT release reads it
(images/, annotations/ semantic pngs 1..150, annotations_instance/ with R = instance category,
G = instance id) and, optionally, Mask2Former's panoptic json + pngs written from those two by
`ade20k_panoptic_json`, which redoes Mask2Former's datasets/prepare_ade20k_pan_seg.py.
`write_coco_instances(root, ...)`: root/{train2017,val2017}/*.jpg and
root/annotations/instances_{train,val}2017.json, as COCO's detection release, with every kind
of segmentation COCO has and instances that overlap (`COCO_INSTANCE_CATEGORIES`).
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from segvit_jax.data import synthetic

THING_IDS = (1, 2, 3, 4, 5)  # COCO category ids of the synthetic shape classes 1..5
STUFF_ID = 200


def _id_to_rgb(ids: np.ndarray) -> np.ndarray:
  ids = np.asarray(ids, np.int64)
  return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


def coco_categories() -> list[dict]:
  names = synthetic.CLASS_NAMES
  return ([{"id": cid, "name": names[i + 1], "isthing": 1, "supercategory": "shape"}
           for i, cid in enumerate(THING_IDS)]
          + [{"id": STUFF_ID, "name": names[0], "isthing": 0, "supercategory": "stuff"}])


def write_coco_panoptic(root: str, num_train: int = 8, num_val: int = 4, size: int = 64,
                        seed: int = 0, crowd_every: int = 0) -> str:
  """Writes the miniature COCO panoptic copy under `root` and returns it. With
  `crowd_every` = n > 0, the last object of every n-th image is marked `iscrowd`."""
  os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
  image_id = 1
  for split, count in (("train2017", num_train), ("val2017", num_val)):
    img_dir = os.path.join(root, split)
    png_dir = os.path.join(root, "annotations", f"panoptic_{split}")
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(png_dir, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
      image, label, instances = synthetic.generate_scene(seed, split, i, size)
      stem = f"{image_id:012d}"
      ids = np.zeros(label.shape, np.int64)
      segments = []
      ids[instances == 0] = 1
      segments.append({"id": 1, "category_id": STUFF_ID, "iscrowd": 0,
                       "area": int(np.sum(instances == 0))})
      present = [k for k in np.unique(instances) if k > 0]
      for n, k in enumerate(present):
        seg_id = 2 + int(k)
        mask = instances == k
        ids[mask] = seg_id
        cls = int(label[mask][0])
        crowd = int(crowd_every > 0 and i % crowd_every == 0 and n == len(present) - 1)
        segments.append({"id": seg_id, "category_id": THING_IDS[cls - 1], "iscrowd": crowd,
                         "area": int(mask.sum())})
      Image.fromarray(image).save(os.path.join(img_dir, stem + ".jpg"), quality=95)
      Image.fromarray(_id_to_rgb(ids)).save(os.path.join(png_dir, stem + ".png"))
      images.append({"id": image_id, "file_name": stem + ".jpg", "height": size,
                     "width": size})
      annotations.append({"image_id": image_id, "file_name": stem + ".png",
                          "segments_info": segments})
      image_id += 1
    with open(os.path.join(root, "annotations", f"panoptic_{split}.json"), "w") as f:
      json.dump({"images": images, "annotations": annotations,
                 "categories": coco_categories()}, f)
  return str(root)


# Sparse COCO ids, in the json's order: contiguous classes 0, 1, 2.
COCO_INSTANCE_CATEGORIES = ({"id": 1, "name": "red", "supercategory": "colour"},
                            {"id": 3, "name": "green", "supercategory": "colour"},
                            {"id": 7, "name": "blue", "supercategory": "colour"})
_COLOURS = ((220, 30, 30), (30, 200, 40), (40, 60, 230))


def uncompressed_rle(mask: np.ndarray) -> dict:
  """COCO's uncompressed RLE of an (H, W) bool mask: column-major run lengths, 0s first."""
  flat = np.asarray(mask, bool).T.ravel()
  change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
  bounds = np.concatenate([[0], change, [flat.size]])
  counts = np.diff(bounds).tolist()
  if flat[0]:
    counts = [0] + counts
  return {"size": list(mask.shape), "counts": [int(c) for c in counts]}


def write_coco_instances(root: str, num_train: int = 6, num_val: int = 3, size: int = 48,
                         seed: int = 0) -> tuple[str, dict]:
  """Writes the miniature COCO instances copy under `root`; returns (root, expected) with
  expected[split][file_name] = [(mask (H, W) bool, contiguous class, iscrowd, area)] of the
  image's annotations in json order. Every image has, painted in this order (later on top):
  a red box polygon, a green object of two box polygons that overlaps the red box, a blue disk
  as compressed RLE (pycocotools) that overlaps the green; every 2nd image a red crowd blob
  as uncompressed RLE. Box polygons [x0, y0, x1, y0, x1, y1, x0, y1] with integer corners cover
  exactly the pixels [y0, y1) x [x0, x1) under pycocotools' rasterisation. The last val image
  is listed without annotations (readers leave it out)."""
  from pycocotools import mask as mask_util  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
  expected, image_id, ann_id = {}, 1, 1
  for split, count in (("train2017", num_train), ("val2017", num_val)):
    os.makedirs(os.path.join(root, split), exist_ok=True)
    images, annotations, expected[split] = [], [], {}
    for i in range(count + (split == "val2017")):
      name = f"{image_id:012d}.jpg"
      h, w = size, size + 8  # not square
      image = rng.integers(90, 150, (h, w, 3)).astype(np.uint8)
      images.append({"id": image_id, "file_name": name, "height": h, "width": w})
      if i == count:  # no annotations
        Image.fromarray(image).save(os.path.join(root, split, name), quality=95)
        image_id += 1
        continue
      objects = []
      x0, y0 = (int(v) for v in rng.integers(2, 12, 2))
      x1, y1 = x0 + int(rng.integers(12, 20)), y0 + int(rng.integers(12, 20))
      box = np.zeros((h, w), bool)
      box[y0:y1, x0:x1] = True
      objects.append((box, 0, 0, [[x0, y0, x1, y0, x1, y1, x0, y1]]))
      # Green: two boxes, the first overlapping the red box's lower right corner.
      gx, gy = x1 - 4, y1 - 4
      parts = [(gx, gy, gx + 10, gy + 8), (gx + 2, gy + 10, gx + 6, gy + 14)]
      green = np.zeros((h, w), bool)
      for a, b, c, d in parts:
        green[b:d, a:c] = True
      objects.append((green, 1, 0, [[a, b, c, b, c, d, a, d] for a, b, c, d in parts]))
      cx, cy, r = gx + 9, gy + 5, 4 + int(rng.integers(0, 3))
      rows, cols = np.mgrid[:h, :w]
      disk = (cols - cx) ** 2 + (rows - cy) ** 2 <= r * r
      rle = mask_util.encode(np.asfortranarray(disk.astype(np.uint8)))
      objects.append((disk, 2, 0, {"size": [h, w], "counts": rle["counts"].decode("ascii")}))
      if i % 2 == 0:
        blob = np.zeros((h, w), bool)
        blob[h - 10:h - 2, w - 14:w - 3] = True
        blob[h - 12:h - 10, w - 10:w - 6] = True
        objects.append((blob, 0, 1, uncompressed_rle(blob)))
      expected[split][name] = []
      for mask, cls, crowd, segmentation in objects:
        image[mask] = _COLOURS[cls]
        area = float(mask.sum())
        annotations.append({"id": ann_id, "image_id": image_id,
                            "category_id": COCO_INSTANCE_CATEGORIES[cls]["id"],
                            "segmentation": segmentation, "area": area, "iscrowd": crowd,
                            "bbox": [0, 0, 0, 0]})
        expected[split][name].append((mask, cls, crowd, area))
        ann_id += 1
      Image.fromarray(image).save(os.path.join(root, split, name), quality=95)
      image_id += 1
    with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
      json.dump({"images": images, "annotations": annotations,
                 "categories": list(COCO_INSTANCE_CATEGORIES)}, f)
  return str(root), expected


def image_file(path, h, w, seed=0):
  """A random RGB image file (JPEG or PNG by its name); returns it as decoded."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image = np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8)
  Image.fromarray(image).save(path)
  return np.asarray(Image.open(path).convert("RGB"))  # as decoded (JPEG is lossy)


def label_file(path, label):
  """An 8-bit single-channel label PNG."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.asarray(label, np.uint8), mode="L").save(path)


def lines_file(path, names):
  """A text file of one name per line."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write("".join(n + "\n" for n in names))


def pascal_context(voc, label):
  """A miniature VOC2010 PASCAL-Context layout under `voc` whose four labels are `label`:
  train lists 2008_000003, 2008_000002; val 2008_000007; 2008_000099 is in no list."""
  for i, name in enumerate(["2008_000002", "2008_000003", "2008_000007", "2008_000099"]):
    image_file(f"{voc}/JPEGImages/{name}.jpg", *label.shape, seed=i)
    label_file(f"{voc}/SegmentationClassContext/{name}.png", label)
  lines_file(f"{voc}/ImageSets/SegmentationContext/train.txt", ["2008_000003", "2008_000002"])
  lines_file(f"{voc}/ImageSets/SegmentationContext/val.txt", ["2008_000007"])


def ade20k(root: str, num_train: int = 6, num_val: int = 2) -> None:
  """A miniature ADEChallengeData2016 in the real layout (JPEG images, 8-bit PNG labels with
  0 = other and 1..150)."""
  rng = np.random.default_rng(0)
  for split, n in (("training", num_train), ("validation", num_val)):
    for d in (f"images/{split}", f"annotations/{split}"):
      os.makedirs(os.path.join(root, d), exist_ok=True)
    prefix = "ADE_train" if split == "training" else "ADE_val"
    for i in range(n):
      h, w = (48, 64) if i % 2 else (64, 48)
      label = np.zeros((h, w), np.uint8)
      label[:, w // 2:] = rng.integers(1, 151)
      label[h // 2:, :] = rng.integers(1, 151)
      image = (rng.integers(0, 64, (h, w, 3)) + label[..., None]).astype(np.uint8)
      name = f"{prefix}_{i + 1:08d}"
      Image.fromarray(image).save(os.path.join(root, f"images/{split}", name + ".jpg"))
      Image.fromarray(label, mode="L").save(os.path.join(root, f"annotations/{split}",
                                                         name + ".png"))


# The synthetic shape classes 1..5 are ADE20K instance categories 1..5 (bed, windowpane,
# cabinet, person, door); the background is wall (top half) and floor (bottom half).
ADE_WALL, ADE_FLOOR = 0, 3


def write_ade20k_panoptic(root: str, num_train: int = 4, num_val: int = 2, size: int = 32,
                          seed: int = 0, instances_beside: bool = False,
                          m2f_json: bool = False) -> str:
  """Writes a miniature ADEChallengeData2016 under `root` (returned) in the EoMT release's
  layout, annotations_instance inside it (or beside it with `instances_beside`). The semantic
  png labels a 3x3 corner of every object wall (the two annotations overlap, as in ADE20K), the
  top-left pixel "other", and every 3rd image's last object has no instance (its pixels are
  void). With `m2f_json`, also Mask2Former's json layout (`ade20k_panoptic_json`)."""
  from segvit_jax.data import ade20k_panoptic  # pylint: disable=g-import-not-at-top
  instance_root = os.path.join(os.path.dirname(root), "annotations_instance") if (
      instances_beside) else os.path.join(root, "annotations_instance")
  for split, count in (("training", num_train), ("validation", num_val)):
    prefix = "ADE_train" if split == "training" else "ADE_val"
    dirs = [os.path.join(root, "images", split), os.path.join(root, "annotations", split),
            os.path.join(instance_root, split)]
    for d in dirs:
      os.makedirs(d, exist_ok=True)
    for i in range(count):
      image, label, instances = synthetic.generate_scene(seed, split, i, size)
      semantic = np.full(label.shape, ADE_FLOOR + 1, np.uint8)
      semantic[: size // 2] = ADE_WALL + 1
      semantic[0, 0] = 0
      instance = np.zeros(label.shape + (3,), np.uint8)
      present = [k for k in np.unique(instances) if k > 0]
      for n, k in enumerate(present):
        mask = instances == k
        category = int(label[mask][0])
        semantic[mask] = ade20k_panoptic.INSTANCE_TO_CLASS[category - 1] + 1
        ys, xs = np.nonzero(mask)
        semantic[ys.min():ys.min() + 3, xs.min():xs.min() + 3][
            mask[ys.min():ys.min() + 3, xs.min():xs.min() + 3]] = ADE_WALL + 1
        if i % 3 == 0 and n == len(present) - 1:
          continue  # a thing class in the semantic png without an instance
        instance[mask] = (category, k, 0)
      name = f"{prefix}_{i + 1:08d}"
      Image.fromarray(image).save(os.path.join(dirs[0], name + ".jpg"), quality=95)
      Image.fromarray(semantic, mode="L").save(os.path.join(dirs[1], name + ".png"))
      Image.fromarray(instance).save(os.path.join(dirs[2], name + ".png"))
  if m2f_json:
    ade20k_panoptic_json(root, instance_root)
  return str(root)


def ade20k_panoptic_json(root: str, instance_root: str | None = None) -> None:
  """Mask2Former's datasets/prepare_ade20k_pan_seg.py on `root` (written here from its code, not
  from segvit_jax): for every image, a segment per stuff category of the semantic png (its
  unique values - 1, 255 and thing categories skipped), painted first, then a segment per
  instance id of the instance png, painted over them; categories 0..149 flagged thing by the
  instance -> semantic mapping; root/ade20k_panoptic_{train,val}.json and
  root/ade20k_panoptic_{train,val}/*.png. Segment ids here are 1, 2, ... (Mask2Former draws
  random colours)."""
  from segvit_jax.data import ade20k, ade20k_panoptic  # pylint: disable=g-import-not-at-top
  instance_root = instance_root or os.path.join(root, "annotations_instance")
  map_id = dict(enumerate(ade20k_panoptic.INSTANCE_TO_CLASS))
  names = list(ade20k.ADE20K_CLASSES)
  names[6] = "road, route"  # Mask2Former's names differ from mmseg's in places
  categories = [{"id": k, "name": n, "isthing": int(k in map_id.values())}
                for k, n in enumerate(names)]
  for name, dirname in (("train", "training"), ("val", "validation")):
    out_folder = os.path.join(root, f"ade20k_panoptic_{name}")
    os.makedirs(out_folder, exist_ok=True)
    images, annotations = [], []
    for filename in sorted(os.listdir(os.path.join(root, "images", dirname))):
      image_id = filename.split(".")[0]
      width, height = Image.open(os.path.join(root, "images", dirname, filename)).size
      images.append({"id": image_id, "file_name": filename, "width": width, "height": height})
      sem_seg = np.asarray(Image.open(os.path.join(root, "annotations", dirname,
                                                   image_id + ".png")))
      ins_seg = np.asarray(Image.open(os.path.join(instance_root, dirname, image_id + ".png")))
      semantic_cat_ids = sem_seg - 1  # uint8: "other" becomes 255
      instance_cat_ids = ins_seg[..., 0] - 1
      instance_ins_ids = ins_seg[..., 1]
      pan_seg = np.zeros((height, width), np.int64)
      segm_info = []
      for semantic_cat_id in np.unique(semantic_cat_ids):
        if semantic_cat_id == 255 or categories[semantic_cat_id]["isthing"]:
          continue
        mask = semantic_cat_ids == semantic_cat_id
        pan_seg[mask] = len(segm_info) + 1
        segm_info.append({"id": len(segm_info) + 1, "category_id": int(semantic_cat_id),
                          "area": int(mask.sum()), "iscrowd": 0})
      for thing_id in np.unique(instance_ins_ids):
        if thing_id == 0:
          continue
        mask = instance_ins_ids == thing_id
        instance_cat_id = np.unique(instance_cat_ids[mask])
        assert len(instance_cat_id) == 1
        pan_seg[mask] = len(segm_info) + 1
        segm_info.append({"id": len(segm_info) + 1,
                          "category_id": int(map_id[int(instance_cat_id[0])]),
                          "area": int(mask.sum()), "iscrowd": 0})
      annotations.append({"image_id": image_id, "file_name": image_id + ".png",
                          "segments_info": segm_info})
      Image.fromarray(_id_to_rgb(pan_seg)).save(os.path.join(out_folder, image_id + ".png"))
    with open(os.path.join(root, f"ade20k_panoptic_{name}.json"), "w") as f:
      json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
