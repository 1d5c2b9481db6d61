"""Tests for segvit_jax.data.datasets and the COCO-Stuff converter (spec datasets.md).

Each layout is fabricated in miniature (tiny JPEG / PNG / .mat files at the real paths and in
the real encodings) and read back through `sources.get_source`.
"""

import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import scipy.io
from PIL import Image

from segvit_jax.data import cocostuff
from segvit_jax.data import datasets
from segvit_jax.data.sources import get_source
from tests import fabricate

_REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)


def _cfg(**kw):
  return ml_collections.ConfigDict(kw)


# ----------------------------------------------------------------------------------------------
# Cityscapes.


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
  np.testing.assert_array_equal(source.palette[[0, 1, 13]],
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
  np.testing.assert_array_equal(datasets.cityscapes_to_train_ids(np.array([-1, 26, 0, 34, 300])),
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


# ----------------------------------------------------------------------------------------------
# PASCAL-Context.


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
  assert len(get_source(_cfg(name="pascal_context", root=root), "val")) == 1
  r60, r59 = pc60[1], pc59[1]
  np.testing.assert_array_equal(r60["label"], label)
  np.testing.assert_array_equal(r59["label"], [[255, 4, 58], [255, 0, 255]])
  np.testing.assert_array_equal(r60["image"], r59["image"])
  assert r60["image"].shape == (2, 3, 3) and r60["image"].dtype == np.uint8
  assert pc60.class_names[:3] == ("background", "aeroplane", "bag")
  assert pc60.class_names[15] == "cat" and pc60.class_names[59] == "wood"
  assert pc59.class_names == pc60.class_names[1:] and pc59.class_names[4] == "bench"
  np.testing.assert_array_equal(pc59.palette, pc60.palette[1:])


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
    get_source(_cfg(name="pascal_context", root=root, reduce_zero_label=True), "val")


# ----------------------------------------------------------------------------------------------
# COCO-Stuff-10K: raw release -> converter -> source.


def test_cocostuff_to_train_ids_all_183_ids():
  out = cocostuff.cocostuff_to_train_ids(np.arange(183))
  assert out.dtype == np.uint8
  unused = [12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91]
  assert [i for i in range(183) if out[i] == 255] == [0] + unused
  np.testing.assert_array_equal(out[np.setdiff1d(np.arange(1, 183), unused)], np.arange(171))
  assert out[[1, 11, 13, 90, 92, 182]].tolist() == [0, 10, 11, 79, 80, 170]
  assert out.reshape(1, 183).shape == (1, 183)
  np.testing.assert_array_equal(cocostuff.cocostuff_to_train_ids(np.array([[0, 1], [12, 182]]),
                                                                 ignore_index=254),
                                [[254, 0], [254, 170]])
  for bad in (183, -1):
    with pytest.raises(ValueError, match=f"id\\(s\\) {bad} outside 0..182"):
      cocostuff.cocostuff_to_train_ids(np.array([0, bad, 5]))
  names = datasets.COCO_STUFF_CLASSES
  assert len(names) == 171
  assert (names[0], names[11], names[79], names[80], names[170]) == (
      "person", "stop sign", "toothbrush", "banner", "wood")


_RAW_IDS = np.array([[0, 1, 11, 12], [13, 92, 182, 91]], np.uint16)
_TRAIN_IDS = [[255, 0, 10, 255], [11, 80, 170, 255]]


def _raw_cocostuff(raw, names_by_split):
  for split, names in names_by_split.items():
    fabricate.lines_file(f"{raw}/imageLists/{split}.txt", names)
    for i, name in enumerate(names):
      fabricate.image_file(f"{raw}/images/{name}.jpg", 2, 4, seed=i)
      os.makedirs(f"{raw}/annotations", exist_ok=True)
      scipy.io.savemat(f"{raw}/annotations/{name}.mat", {"S": _RAW_IDS})


def test_cocostuff_round_trip(tmp_path):
  raw, out = str(tmp_path / "cocostuff-10k-v1.1"), str(tmp_path / "coco_stuff10k")
  train = ["COCO_train2014_000000000077", "COCO_train2014_000000000009",
           "COCO_train2014_000000000025"]
  _raw_cocostuff(raw, {"train": train, "test": ["COCO_train2014_000000000030"]})
  run = subprocess.run([sys.executable, "-m", "segvit_jax.data.cocostuff", raw, out, "--quiet"],
                       cwd=_REPO, capture_output=True, text=True, check=False)
  assert run.returncode == 0, run.stderr
  assert "wrote 3 train + 1 test images" in run.stdout
  assert "5 of 171 classes occur" in run.stdout  # ids 1, 11, 13, 92, 182
  assert "37.5% of 32 pixels unlabelled" in run.stdout  # 0, 12 and 91: 3 of 8 per image
  with open(os.path.join(out, "imageLists", "train.txt")) as f:
    assert f.read().split() == train
  label_file = os.path.join(out, "annotations", "train2014",
                            "COCO_train2014_000000000077_labelTrainIds.png")
  assert Image.open(label_file).mode == "L"

  cfg = _cfg(name="coco_stuff10k", root=out, num_classes=171)
  source = get_source(cfg, "train")
  assert [source[i]["name"] for i in range(3)] == train  # list order
  assert source.class_names == datasets.COCO_STUFF_CLASSES
  r = source[0]
  np.testing.assert_array_equal(r["label"], _TRAIN_IDS)
  raw_image = np.asarray(Image.open(os.path.join(raw, "images", train[0] + ".jpg")))
  np.testing.assert_array_equal(r["image"], raw_image)  # the JPEG is copied byte for byte
  for split in ("val", "test"):
    assert [x["name"] for x in get_source(cfg, split)] == ["COCO_train2014_000000000030"]
  np.testing.assert_array_equal(source.palette, datasets.PALETTES["coco_stuff10k"])

  # The list selects the split's images; without lists every image in the folder is read.
  fabricate.image_file(
      os.path.join(out, "images", "train2014", "COCO_train2014_000000000001.jpg"), 2, 4)
  fabricate.label_file(os.path.join(out, "annotations", "train2014",
                                    "COCO_train2014_000000000001_labelTrainIds.png"),
                       np.zeros((2, 4)))
  assert len(get_source(cfg, "train")) == 3
  os.remove(os.path.join(out, "imageLists", "train.txt"))
  assert get_source(cfg, "train")[0]["name"] == "COCO_train2014_000000000001"  # sorted


def test_cocostuff_converter_errors_name_the_file(tmp_path, capsys):
  raw = str(tmp_path / "raw")
  _raw_cocostuff(raw, {"train": ["a", "b"], "test": ["c"]})
  scipy.io.savemat(f"{raw}/annotations/b.mat", {"labels": _RAW_IDS})
  with pytest.raises(ValueError, match=r"b\.mat has no label map \"S\" \(keys: labels\)"):
    cocostuff.convert(raw, str(tmp_path / "out1"), progress=False)
  scipy.io.savemat(f"{raw}/annotations/b.mat", {"S": _RAW_IDS + 100})  # 191, 192, 282 > 182
  with pytest.raises(ValueError, match=r"b\.mat: COCO-Stuff id\(s\) 191, 192, 282 outside"):
    cocostuff.convert(raw, str(tmp_path / "out2"), progress=False)
  scipy.io.savemat(f"{raw}/annotations/b.mat", {"S": _RAW_IDS[:, :3]})
  with pytest.raises(ValueError, match=r"b\.mat is 3x2 \(WxH\) but image .*b\.jpg is 4x2"):
    cocostuff.convert(raw, str(tmp_path / "out3"), progress=False)
  os.remove(f"{raw}/images/c.jpg")
  assert cocostuff.main([raw, str(tmp_path / "out4"), "--quiet"]) == 1
  assert "1 file(s) named in" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "out4")  # checked before writing anything
  with pytest.raises(FileNotFoundError, match="missing directory .*nowhere/images"):
    cocostuff.convert(str(tmp_path / "nowhere"), str(tmp_path / "out5"), progress=False)


def test_coco_stuff10k_source_errors_and_mmseg_encoding(tmp_path):
  root = str(tmp_path / "coco_stuff10k")
  cfg = _cfg(name="coco_stuff10k", root=root, num_classes=171)
  fabricate.image_file(f"{root}/images/test2014/x.jpg", 1, 3)
  with pytest.raises(FileNotFoundError, match=os.path.join(root, "annotations", "test2014")):
    get_source(cfg, "test")
  # mmseg's converter writes 0 = unlabelled, classes 1..171.
  fabricate.label_file(f"{root}/annotations/test2014/x_labelTrainIds.png", [[0, 1, 171]])
  with pytest.raises(ValueError, match="value\\(s\\) 171 outside .*reduce_zero_label = True"):
    get_source(cfg, "test")[0]
  cfg.reduce_zero_label = True
  np.testing.assert_array_equal(get_source(cfg, "test")[0]["label"], [[255, 0, 170]])
  fabricate.lines_file(f"{root}/imageLists/test.txt", ["x", "y"])
  with pytest.raises(FileNotFoundError, match="2 file.*test.txt do not exist: .*test2014/y.jpg, "
                     ".*y_labelTrainIds.png"):
    get_source(cfg, "test")
  with pytest.raises(ValueError, match="unknown COCO-Stuff-10K split 'validation'"):
    get_source(cfg, "validation")


# ----------------------------------------------------------------------------------------------
# Palettes.


def test_palettes_have_one_distinct_colour_per_class():
  sizes = dict(ade20k=150, coco_stuff10k=171, pascal_context=60, pascal_context59=59,
               cityscapes=19)
  assert set(datasets.PALETTES) == set(sizes)
  for name, palette in datasets.PALETTES.items():
    assert palette.dtype == np.uint8 and palette.shape == (sizes[name], 3), name
    assert len({tuple(c) for c in palette}) == sizes[name], name
    assert not (palette == 0).all(-1).any(), name  # black is left for ignore pixels
    np.testing.assert_array_equal(datasets.palette_for(name, sizes[name]), palette)
  np.testing.assert_array_equal(datasets.PALETTES["cityscapes"][[0, 1, 10, 18]],
                                [[128, 64, 128], [244, 35, 232], [70, 130, 180], [119, 11, 32]])
  np.testing.assert_array_equal(datasets.generated_palette(4),
                                [[0, 255, 0], [0, 0, 255], [255, 0, 0], [0, 255, 255]])
  # Other datasets / class counts: the generated sequence, whose prefixes are stable.
  np.testing.assert_array_equal(datasets.palette_for("synthetic", 6),
                                datasets.PALETTES["ade20k"][:6])
  np.testing.assert_array_equal(datasets.palette_for("ade20k", 151),
                                datasets.PALETTES["coco_stuff10k"][:151])
  p = datasets.palette_for("cityscapes", 19)
  p[0] = 0  # a copy: the table is not changed
  assert datasets.PALETTES["cityscapes"][0].tolist() == [128, 64, 128]
