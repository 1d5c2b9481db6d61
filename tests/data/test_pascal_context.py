"""Tests for segvit_jax.data.pascal_context on a miniature VOC2010 written here: the 60- and
59-class variants from the same files, read through `registry.get_source`."""

import os

import numpy as np
import pytest

from segvit_jax.data import palettes
from segvit_jax.data.registry import get_source
from tests import fabricate, support


def _cfg(**kw):
  return support.dataset_config(**kw)


@pytest.mark.parametrize("nested", [True, False])
def test_pascal_context_60_and_59_from_the_same_files(tmp_path, nested):
  root = str(tmp_path / "pc")
  voc = os.path.join(root, "VOCdevkit", "VOC2010") if nested else root
  label = np.array([[0, 5, 59], [255, 1, 0]], np.uint8)
  fabricate.pascal_context(voc, label)
  pc60 = get_source(_cfg(name="pascal_context", root=root, num_classes=60), "train")
  pc59 = get_source(_cfg(name="pascal_context59", root=root, num_classes=59), "train")
  # The split list decides membership and order (2008_000099 is in no list).
  assert [pc60[i]["name"] for i in range(len(pc60))] == ["2008_000003", "2008_000002"]
  assert len(pc59) == 2
  assert len(get_source(_cfg(name="pascal_context", root=root, num_classes=60), "val")) == 1
  r60, r59 = pc60[1], pc59[1]
  np.testing.assert_array_equal(r60["label"], label)
  np.testing.assert_array_equal(r59["label"], [[255, 4, 58], [255, 0, 255]])
  np.testing.assert_array_equal(r60["image"], r59["image"])
  assert r60["image"].shape == (2, 3, 3) and r60["image"].dtype == np.uint8
  assert pc60.class_names[:3] == ("background", "aeroplane", "bag")
  assert pc60.class_names[15] == "cat" and pc60.class_names[59] == "wood"
  assert pc59.class_names == pc60.class_names[1:] and pc59.class_names[4] == "bench"
  np.testing.assert_array_equal(palettes.palette_for_class_names(pc59.class_names),
                                palettes.palette_for_class_names(pc60.class_names)[1:])


def test_pascal_context_layout_errors(tmp_path):
  root = str(tmp_path / "pc")
  cfg = _cfg(name="pascal_context", root=root, num_classes=60)
  with pytest.raises(FileNotFoundError, match="found neither .*VOCdevkit/VOC2010 nor "
                     ".*JPEGImages"):
    get_source(cfg, "train")
  voc = os.path.join(root, "VOCdevkit", "VOC2010")
  fabricate.image_file(f"{voc}/JPEGImages/2008_000002.jpg", 2, 2)
  fabricate.label_file(f"{voc}/SegmentationClassContext/2008_000002.png", np.zeros((2, 2)))
  with pytest.raises(FileNotFoundError, match="missing file .*SegmentationContext/val.txt") as e:
    get_source(cfg, "val")
  assert "root/VOCdevkit/VOC2010" in str(e.value)  # says which layout was found
  fabricate.lines_file(f"{voc}/ImageSets/SegmentationContext/val.txt",
                       ["2008_000002", "2008_000004"])
  with pytest.raises(FileNotFoundError, match="2 file.*val.txt do not exist: .*2008_000004.jpg, "
                     ".*SegmentationClassContext/2008_000004.png"):
    get_source(cfg, "val")
  fabricate.lines_file(f"{voc}/ImageSets/SegmentationContext/val.txt", ["2008_000002"])
  assert len(get_source(cfg, "val")) == 1
  with pytest.raises(ValueError, match="num_classes is 59 but dataset 'pascal_context' has 60"):
    get_source(_cfg(name="pascal_context", root=root, num_classes=59), "val")
  with pytest.raises(ValueError, match="'pascal_context59' ignores background"):
    get_source(_cfg(name="pascal_context", root=root, reduce_zero_label=True, num_classes=60),
               "val")
