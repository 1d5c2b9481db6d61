"""Tests for segvit_jax.data.coco_panoptic on a miniature COCO panoptic written here."""

import json
import os
import re

import grain
import numpy as np
import pytest
from PIL import Image

from segvit_jax.data import coco_panoptic as cp
from segvit_jax.data import registry
from tests import support

# Sparse COCO ids (1, 3, 92, 200) -> contiguous 0..3 in list order: 2 things, then 2 stuff.
_CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1},
    {"id": 3, "name": "car", "isthing": 1},
    {"id": 92, "name": "banner", "isthing": 0},
    {"id": 200, "name": "rug-merged", "isthing": 0},
]
# Segment ids using all three PNG channels: 197121 = (1, 2, 3), 13107207 = (7, 0, 200).
_A, _B, _C, _CROWD, _D, _E, _F = 197121, 5, 13107207, 300, 4000000, 12, 65536
_IDS = {
    "000000000139": [[_A, _A, _B, _B, 0, _CROWD],
                     [_A, _A, _B, _B, 0, _CROWD],
                     [_C, _C, _C, _C, _C, _C],
                     [_C, _C, _C, _C, 0, 0]],
    "000000000285": [[_D, _D, _D, _E, _E],
                     [_D, _D, _D, _E, _E],
                     [_D, _D, _D, 0, 0]],
    "000000000632": [[_F, _F], [_F, 0]],
}
_SEGMENTS = {
    "000000000139": [  # json order: stuff first, the crowd in the middle
        {"id": _C, "category_id": 92, "iscrowd": 0},
        {"id": _CROWD, "category_id": 1, "iscrowd": 1},
        {"id": _A, "category_id": 1, "iscrowd": 0},
        {"id": _B, "category_id": 3, "iscrowd": 0},
    ],
    "000000000285": [
        {"id": _E, "category_id": 1, "iscrowd": 0},
        {"id": _D, "category_id": 200, "iscrowd": 0},
    ],
    "000000000632": [{"id": _F, "category_id": 3, "iscrowd": 0}],
}
_SPLITS = {"train2017": ["000000000285", "000000000139"], "val2017": ["000000000632"]}
_GREY = {"000000000139": 40, "000000000285": 130, "000000000632": 220}


def _id_to_rgb(ids):
  ids = np.asarray(ids, np.int64)
  return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


def _make_coco(root, edit_json=None):
  """Write the miniature dataset under root; edit_json(split_folder, data) may alter a json."""
  os.makedirs(os.path.join(root, "annotations"))
  for folder, stems in _SPLITS.items():
    os.makedirs(os.path.join(root, folder))
    os.makedirs(os.path.join(root, "annotations", f"panoptic_{folder}"))
    images, annotations = [], []
    for image_id, stem in enumerate(stems, start=7):
      ids = np.asarray(_IDS[stem])
      Image.fromarray(np.full(ids.shape + (3,), _GREY[stem], np.uint8)).save(
          os.path.join(root, folder, stem + ".jpg"))
      Image.fromarray(_id_to_rgb(ids)).save(
          os.path.join(root, "annotations", f"panoptic_{folder}", stem + ".png"))
      images.append({"id": image_id, "file_name": stem + ".jpg", "height": ids.shape[0],
                     "width": ids.shape[1]})
      annotations.append({"image_id": image_id, "file_name": stem + ".png",
                          "segments_info": [dict(s) for s in _SEGMENTS[stem]]})
    data = {"images": images, "annotations": annotations, "categories": _CATEGORIES}
    if edit_json is not None:
      edit_json(folder, data)
    with open(os.path.join(root, "annotations", f"panoptic_{folder}.json"), "w") as f:
      json.dump(data, f)
  return str(root)


@pytest.fixture
def root(tmp_path):
  return _make_coco(tmp_path / "coco")


def _mask(stem, segment_id):
  return np.asarray(_IDS[stem]) == segment_id


# ----------------------------------------------------------------------------------------------
# Helpers.


def test_rgb_to_id():
  png = np.array([[[1, 2, 3], [7, 0, 200], [255, 255, 255], [0, 0, 0]]], np.uint8)
  assert cp.rgb_to_id(png).tolist() == [[197121, 13107207, 16777215, 0]]
  assert cp.rgb_to_id(png).dtype == np.int32
  np.testing.assert_array_equal(cp.rgb_to_id(_id_to_rgb(_IDS["000000000139"])),
                                _IDS["000000000139"])


def test_semantic_label():
  masks = np.zeros((2, 2, 3), bool)
  masks[0, 0] = True
  masks[1, 1, 2] = True
  record = dict(masks=masks, class_ids=np.array([4, 132], np.int32))
  out = cp.semantic_label(record)
  assert out.dtype == np.uint8 and out.tolist() == [[4, 4, 4], [255, 255, 132]]
  empty = dict(masks=np.zeros((0, 2, 2), bool), class_ids=np.zeros((0,), np.int32))
  assert cp.semantic_label(empty, ignore_index=7).tolist() == [[7, 7], [7, 7]]


# ----------------------------------------------------------------------------------------------
# Records.


def test_categories_and_split_order(root):
  src = cp.coco_panoptic_source(root, "train")
  assert src.class_names == ("person", "car", "banner", "rug-merged")
  assert src.thing_classes == ("person", "car")
  assert src.is_thing_class == (True, True, False, False)
  assert len(src) == 2
  assert [src[i]["name"] for i in range(2)] == ["000000000139", "000000000285"]  # sorted
  assert len(cp.coco_panoptic_source(root, "val2017")) == 1


def test_records_exact_with_crowd_dropped(root):
  src = cp.coco_panoptic_source(root, "train")
  r = src[0]
  assert set(r) == {"image", "masks", "class_ids", "is_thing", "is_crowd", "name"}
  assert r["is_crowd"].dtype == bool and not r["is_crowd"].any()
  assert r["name"] == "000000000139"
  assert r["image"].shape == (4, 6, 3) and r["image"].dtype == np.uint8
  assert abs(float(r["image"].mean()) - 40) < 3  # JPEG
  assert r["masks"].dtype == bool and r["masks"].shape == (3, 4, 6)
  for mask, segment_id in zip(r["masks"], (_C, _A, _B)):  # json order, crowd gone
    np.testing.assert_array_equal(mask, _mask("000000000139", segment_id))
  assert r["class_ids"].dtype == np.int32 and r["class_ids"].tolist() == [2, 0, 1]
  assert r["is_thing"].dtype == bool and r["is_thing"].tolist() == [False, True, True]
  assert cp.semantic_label(r).tolist() == [[0, 0, 1, 1, 255, 255],
                                           [0, 0, 1, 1, 255, 255],
                                           [2, 2, 2, 2, 2, 2],
                                           [2, 2, 2, 2, 255, 255]]
  r = src[1]
  assert r["name"] == "000000000285"
  assert r["class_ids"].tolist() == [0, 3] and r["is_thing"].tolist() == [True, False]
  np.testing.assert_array_equal(r["masks"][1], _mask("000000000285", _D))
  assert cp.semantic_label(r).tolist() == [[3, 3, 3, 0, 0], [3, 3, 3, 0, 0], [3, 3, 3, 255, 255]]


def test_keep_crowd_and_builder(root):
  cfg = support.dataset_config(name="coco_panoptic", root=root, num_classes=4,
                               drop_crowd=False)
  src = registry.get_source(cfg, "train")
  assert isinstance(src, cp.CocoPanoptic)
  r = src[0]
  assert r["class_ids"].tolist() == [2, 0, 0, 1] and r["is_thing"].tolist() == [False] + [True] * 3
  assert r["is_crowd"].tolist() == [False, True, False, False]
  np.testing.assert_array_equal(r["masks"][1], _mask("000000000139", _CROWD))
  assert cp.semantic_label(r)[:2, 4:].tolist() == [[255, 0], [255, 0]]
  cfg.drop_crowd = support.dataset_config().drop_crowd  # the skeleton's default: dropped
  assert registry.get_source(cfg, "train")[0]["class_ids"].tolist() == [2, 0, 1]
  ds = grain.MapDataset.source(registry.get_source(cfg, "val")).map(
      lambda r: (r["name"], r["class_ids"].tolist()))
  assert ds[0] == ("000000000632", [1])
  cfg.num_classes = 133
  with pytest.raises(ValueError, match="num_classes is 133 but dataset 'coco_panoptic' has 4"):
    registry.get_source(cfg, "train")


# ----------------------------------------------------------------------------------------------
# Errors.


def test_missing_root_json_and_split(tmp_path, root):
  missing = re.escape(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match=f"missing directory {missing}"):
    cp.coco_panoptic_source(str(tmp_path / "nope"), "train")
  json_path = os.path.join(root, "annotations", "panoptic_val2017.json")
  os.remove(json_path)
  with pytest.raises(FileNotFoundError, match=f"missing file {re.escape(json_path)}"):
    cp.coco_panoptic_source(root, "val")
  with pytest.raises(ValueError, match="unknown COCO panoptic split 'test'"):
    cp.coco_panoptic_source(root, "test")
  cfg = support.dataset_config(name="coco_panoptic", root="")
  with pytest.raises(FileNotFoundError, match="config.dataset.root is empty"):
    registry.get_source(cfg, "train")


def test_missing_png_or_image(root):
  png = os.path.join(root, "annotations", "panoptic_train2017", "000000000285.png")
  os.remove(png)
  with pytest.raises(FileNotFoundError,
                     match=f"1 file.*panoptic_train2017.json.*e.g. {re.escape(png)}"):
    cp.coco_panoptic_source(root, "train")
  image = os.path.join(root, "val2017", "000000000632.jpg")
  os.remove(image)
  with pytest.raises(FileNotFoundError, match=f"missing from .*val2017, e.g. {re.escape(image)}"):
    cp.coco_panoptic_source(root, "val")


def test_unknown_category_names_the_json(tmp_path):
  def edit(folder, data):
    if folder == "train2017":
      data["annotations"][1]["segments_info"][3]["category_id"] = 55
  root = _make_coco(tmp_path / "coco", edit)
  json_path = os.path.join(root, "annotations", "panoptic_train2017.json")
  with pytest.raises(ValueError, match=f"{re.escape(json_path)}: segment 5 of 000000000139.png "
                                       "has category_id 55, which is not in the json's "
                                       "categories"):
    cp.coco_panoptic_source(root, "train")


def test_segment_absent_from_png_names_the_png(tmp_path):
  def edit(folder, data):
    if folder == "val2017":
      data["annotations"][0]["segments_info"].append(
          {"id": 999, "category_id": 92, "iscrowd": 0})
  root = _make_coco(tmp_path / "coco", edit)
  src = cp.coco_panoptic_source(root, "val")  # found on access, like other decoding errors
  png = os.path.join(root, "annotations", "panoptic_val2017", "000000000632.png")
  with pytest.raises(ValueError, match=f"segment id\\(s\\) 999 listed in .*panoptic_val2017.json "
                                       f"do not occur in panoptic png {re.escape(png)}"):
    src[0]


def test_bad_json(tmp_path):
  def edit(folder, data):
    if folder == "val2017":
      data["annotations"][0]["image_id"] = 12345
  root = _make_coco(tmp_path / "coco", edit)
  with pytest.raises(ValueError, match="names image_id 12345, which is not in the json's images"):
    cp.coco_panoptic_source(root, "val")
  with open(os.path.join(root, "annotations", "panoptic_val2017.json"), "w") as f:
    f.write('{"categories": []')
  with pytest.raises(ValueError, match="cannot read COCO panoptic json .*panoptic_val2017.json"):
    cp.coco_panoptic_source(root, "val")
