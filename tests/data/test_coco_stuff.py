"""Tests for segvit_jax.data.coco_stuff: the COCO-Stuff-10K converter and reader (spec
datasets.md).

The raw release is fabricated in miniature (tiny JPEG and .mat files at the real paths and in
the real encodings), converted with the command and read back through `registry.get_source`.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.io
from PIL import Image

from segvit_jax import runtime
from segvit_jax.data import coco_stuff
from segvit_jax.data import palettes
from segvit_jax.data.registry import get_source
from tests import fabricate
from tests import support


def _cfg(**kw):
  return support.dataset_config(**kw)


def test_cocostuff_to_train_ids_all_183_ids():
  out = coco_stuff.cocostuff_to_train_ids(np.arange(183))
  assert out.dtype == np.uint8
  unused = [12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91]
  assert [i for i in range(183) if out[i] == 255] == [0] + unused
  np.testing.assert_array_equal(out[np.setdiff1d(np.arange(1, 183), unused)], np.arange(171))
  assert out[[1, 11, 13, 90, 92, 182]].tolist() == [0, 10, 11, 79, 80, 170]
  assert out.reshape(1, 183).shape == (1, 183)
  np.testing.assert_array_equal(coco_stuff.cocostuff_to_train_ids(np.array([[0, 1], [12, 182]]),
                                                                  ignore_index=254),
                                [[254, 0], [254, 170]])
  for bad in (183, -1):
    with pytest.raises(ValueError, match=f"id\\(s\\) {bad} outside 0..182"):
      coco_stuff.cocostuff_to_train_ids(np.array([0, bad, 5]))
  names = coco_stuff.COCO_STUFF_CLASSES
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
  run = subprocess.run([sys.executable, "-m", "segvit_jax.data.coco_stuff", raw, out, "--quiet"],
                       cwd=support.ROOT, capture_output=True, text=True, check=False)
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
  assert source.class_names == coco_stuff.COCO_STUFF_CLASSES
  r = source[0]
  np.testing.assert_array_equal(r["label"], _TRAIN_IDS)
  raw_image = np.asarray(Image.open(os.path.join(raw, "images", train[0] + ".jpg")))
  np.testing.assert_array_equal(r["image"], raw_image)  # the JPEG is copied byte for byte
  for split in ("val", "test"):
    assert [x["name"] for x in get_source(cfg, split)] == ["COCO_train2014_000000000030"]
  np.testing.assert_array_equal(palettes.palette_for_class_names(source.class_names),
                                palettes.PALETTES["coco_stuff10k"])

  # The list selects the split's images; without lists every image in the folder is read.
  fabricate.image_file(
      os.path.join(out, "images", "train2014", "COCO_train2014_000000000001.jpg"), 2, 4)
  fabricate.label_file(os.path.join(out, "annotations", "train2014",
                                    "COCO_train2014_000000000001_labelTrainIds.png"),
                       np.zeros((2, 4)))
  assert len(get_source(cfg, "train")) == 3
  os.remove(os.path.join(out, "imageLists", "train.txt"))
  assert get_source(cfg, "train")[0]["name"] == "COCO_train2014_000000000001"  # sorted


def test_old_command_name_converts_the_same(tmp_path):
  """`python -m segvit_jax.data.cocostuff` (the README's earlier spelling) is the same command."""
  raw = str(tmp_path / "raw")
  _raw_cocostuff(raw, {"train": ["a"], "test": ["b"]})
  outs = [str(tmp_path / m) for m in ("coco_stuff", "cocostuff")]
  for module, out in zip(("coco_stuff", "cocostuff"), outs):
    run = subprocess.run([sys.executable, "-m", f"segvit_jax.data.{module}", raw, out, "--quiet"],
                         cwd=support.ROOT, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert "wrote 1 train + 1 test images" in run.stdout
  labels = [np.asarray(Image.open(os.path.join(out, "annotations", "train2014",
                                               "a_labelTrainIds.png"))) for out in outs]
  np.testing.assert_array_equal(labels[0], _TRAIN_IDS)
  np.testing.assert_array_equal(labels[1], labels[0])


def test_cocostuff_converter_errors_name_the_file(tmp_path, capsys):
  raw = str(tmp_path / "raw")
  _raw_cocostuff(raw, {"train": ["a", "b"], "test": ["c"]})
  scipy.io.savemat(f"{raw}/annotations/b.mat", {"labels": _RAW_IDS})
  with pytest.raises(ValueError, match=r"b\.mat has no label map \"S\" \(keys: labels\)"):
    coco_stuff.convert(raw, str(tmp_path / "out1"), progress=False)
  scipy.io.savemat(f"{raw}/annotations/b.mat", {"S": _RAW_IDS + 100})  # 191, 192, 282 > 182
  with pytest.raises(ValueError, match=r"b\.mat: COCO-Stuff id\(s\) 191, 192, 282 outside"):
    coco_stuff.convert(raw, str(tmp_path / "out2"), progress=False)
  scipy.io.savemat(f"{raw}/annotations/b.mat", {"S": _RAW_IDS[:, :3]})
  with pytest.raises(ValueError, match=r"b\.mat is 3x2 \(WxH\) but image .*b\.jpg is 4x2"):
    coco_stuff.convert(raw, str(tmp_path / "out3"), progress=False)
  os.remove(f"{raw}/images/c.jpg")
  assert runtime.run(coco_stuff.main, [raw, str(tmp_path / "out4"), "--quiet"],
                     define_flags=coco_stuff.define_flags) == 1
  assert "1 file(s) named in" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "out4")  # checked before writing anything
  with pytest.raises(FileNotFoundError, match="missing directory .*nowhere/images"):
    coco_stuff.convert(str(tmp_path / "nowhere"), str(tmp_path / "out5"), progress=False)


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
