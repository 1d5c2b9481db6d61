"""Tests for segvit_jax.data.cityscapes on a miniature Cityscapes written here: labelTrainIds
and labelIds files at the real paths, read through `registry.get_source`."""

import os

import numpy as np
import pytest

from segvit_jax.data import cityscapes
from segvit_jax.data import palettes
from segvit_jax.data.registry import get_source
from tests import fabricate, support


def _cfg(**kw):
  return support.dataset_config(**kw)


def _cityscapes(root, label, kinds=("labelTrainIds",)):
  """train: aachen (2 images), bochum (1); val: frankfurt (1). Returns {name: image}."""
  images = {}
  for i, (split, city, frame) in enumerate([("train", "bochum", "000000_000313"),
                                            ("train", "aachen", "000001_000019"),
                                            ("train", "aachen", "000000_000019"),
                                            ("val", "frankfurt", "000000_000294")]):
    stem = f"{city}_{frame}"
    images[stem] = fabricate.image_file(
        f"{root}/leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png", *label.shape, seed=i)
    for kind in kinds:
      fabricate.label_file(f"{root}/gtFine/{split}/{city}/{stem}_gtFine_{kind}.png", label)
  return images


def test_cityscapes_label_train_ids(tmp_path):
  root = str(tmp_path / "cityscapes")
  label = np.array([[0, 13, 18], [255, 7, 0]], np.uint8)
  # Both label kinds present (as in the release after createTrainIdLabelImgs): trainIds win.
  images = _cityscapes(root, label, ("labelTrainIds", "labelIds"))
  source = get_source(_cfg(name="cityscapes", root=root, num_classes=19), "train")
  assert len(source) == 3 and len(source.class_names) == 19
  assert source.class_names[:3] == ("road", "sidewalk", "building")
  assert source.class_names[13] == "car" and source.class_names[18] == "bicycle"
  names = [source[i]["name"] for i in range(3)]
  assert names == ["aachen_000000_000019_leftImg8bit", "aachen_000001_000019_leftImg8bit",
                   "bochum_000000_000313_leftImg8bit"]
  r = source[2]
  np.testing.assert_array_equal(r["image"], images["bochum_000000_000313"])  # PNG: lossless
  assert r["label"].dtype == np.uint8
  np.testing.assert_array_equal(r["label"], label)
  np.testing.assert_array_equal(palettes.palette_for_class_names(source.class_names)[[0, 1, 13]],
                                [[128, 64, 128], [244, 35, 232], [0, 0, 142]])
  val = get_source(_cfg(name="cityscapes", root=root, num_classes=19), "val")
  assert len(val) == 1 and val[0]["name"] == "frankfurt_000000_000294_leftImg8bit"


def test_cityscapes_label_ids_map_to_train_ids(tmp_path):
  root = str(tmp_path / "cityscapes")
  raw = np.arange(34, dtype=np.uint8).reshape(2, 17)  # every raw id 0..33 once
  _cityscapes(root, raw, ("labelIds",))
  r = get_source(_cfg(name="cityscapes", root=root, num_classes=19), "val")[0]
  x = 255
  np.testing.assert_array_equal(r["label"], [
      [x, x, x, x, x, x, x, 0, 1, x, x, 2, 3, 4, x, x, x],
      [5, x, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, x, x, 16, 17, 18]])
  assert r["label"][1, 9] == 13 and raw[1, 9] == 26  # car
  # The pure table: license plate (-1) and ids beyond 33 are ignored too.
  np.testing.assert_array_equal(cityscapes.cityscapes_to_train_ids(np.array([-1, 26, 0, 34, 300])),
                                [255, 13, 255, 255, 255])


def test_cityscapes_layout_errors(tmp_path):
  root = str(tmp_path / "cityscapes")
  cfg = _cfg(name="cityscapes", root=root, num_classes=19)
  with pytest.raises(FileNotFoundError, match="cityscapes") as e:
    get_source(cfg, "train")
  assert "leftImg8bit/train/CITY/X_leftImg8bit.png" in str(e.value)
  fabricate.image_file(f"{root}/leftImg8bit/train/ulm/ulm_000000_000019_leftImg8bit.png", 2, 2)
  with pytest.raises(FileNotFoundError, match=os.path.join(root, "gtFine", "train")):
    get_source(cfg, "train")
  fabricate.label_file(f"{root}/gtFine/train/ulm/ulm_000000_000019_gtFine_labelTrainIds.png",
                       np.zeros((2, 2)))
  fabricate.image_file(f"{root}/leftImg8bit/train/ulm/ulm_000000_000020_leftImg8bit.png", 2, 2)
  with pytest.raises(FileNotFoundError,
                     match="1 image.* no label file: .*ulm_000000_000020_gtFine_labelTrainIds"):
    get_source(cfg, "train")
  with pytest.raises(ValueError, match="unknown Cityscapes split 'training'"):
    get_source(cfg, "training")
  cfg.reduce_zero_label = True
  with pytest.raises(ValueError, match="reduce_zero_label is True but dataset 'cityscapes'"):
    get_source(cfg, "train")
