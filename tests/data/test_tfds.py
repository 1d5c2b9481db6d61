"""Tests for segvit_jax.data.tfds: TFDS scene_parse150 / cityscapes read without TensorFlow.

The prepared data is made by TFDS itself: a subclass of the REAL registered builder class (same
name, version, config and features) whose `_split_generators` / `_generate_examples` yield a few
tiny files written here instead of downloading the archives, then
`download_and_prepare(file_format="array_record")`. TFDS's own writer serialises and shuffles the
examples (tf.Example protos via its bundled protos, no TensorFlow) and writes the array_record
shards, features.json and dataset_info.json exactly as `tfds build` does. Only the image sizes
differ from the real data (TFDS stores file bytes as they are, without checking the declared
Cityscapes shape of 1024x2048).
"""

import json
import os
import pickle
import re
import shutil

import grain
import numpy as np
import pytest
from PIL import Image

from segvit_jax.data import ade20k
from segvit_jax.data import cityscapes
from segvit_jax.data import registry
from segvit_jax.data import tfds as ts
from tests import support

tfds = pytest.importorskip("tensorflow_datasets")

# ADE20K fabricated examples: (file stem, grey level, R channel rows). R = instance-task category
# (1 bed, 4 person, 9 car, 100 flag), G = instance id (nonzero, must be ignored).
_ADE_R = {
    "ADE_train_00000001": (30, [[0, 1, 1, 4], [0, 1, 1, 4], [9, 9, 100, 100]]),
    "ADE_train_00000002": (110, [[4, 4, 4, 4], [0, 0, 0, 0], [0, 0, 0, 0]]),
    "ADE_train_00000003": (190, [[100, 0], [0, 100]]),
    "ADE_val_00000001": (60, [[1, 0, 0], [0, 0, 9]]),
    "ADE_val_00000002": (220, [[0, 0], [0, 0], [4, 4]]),
}
# Expected train ids: bed 7, person 12, car 20, flag 149, 0 -> 255.
_ADE_EXPECTED = {
    30: [[255, 7, 7, 12], [255, 7, 7, 12], [20, 20, 149, 149]],
    110: [[12, 12, 12, 12], [255, 255, 255, 255], [255, 255, 255, 255]],
    190: [[149, 255], [255, 149]],
    60: [[7, 255, 255], [255, 255, 20]],
    220: [[255, 255], [255, 255], [12, 12]],
}
# Cityscapes fabricated examples: image id -> (grey level, raw labelIds).
_CITY = {
    "train": {
        "aachen_000000_000019": (20, [[7, 8, 11, 0], [26, 33, 9, 255]]),
        "bochum_000000_000313": (80, [[23, 23, 24, 25], [21, 22, 31, 32]]),
    },
    "val": {
        "frankfurt_000000_000294": (140, [[12, 13, 17, 19], [20, 27, 28, 1]]),
        "lindau_000000_000019": (200, [[6, 10, 14, 29], [30, 34, 5, 7]]),
    },
}
_CITY_EXPECTED = {
    "aachen_000000_000019": [[0, 1, 2, 255], [13, 18, 255, 255]],
    "bochum_000000_000313": [[10, 10, 11, 12], [8, 9, 16, 17]],
    "frankfurt_000000_000294": [[3, 4, 5, 6], [7, 14, 15, 255]],
    "lindau_000000_000019": [[255, 255, 255, 255], [255, 255, 255, 0]],
}


def _prepare(tfds_name, data_dir, split_dirs, generate, config=None):
  """Run TFDS's real prepare pipeline for `tfds_name` on fabricated files (no download)."""
  real = tfds.builder_cls(tfds_name)

  class Fabricated(real, skip_registration=True):
    name = real.name
    # A one-part module name keeps tfds from resolving the builder's code path through
    # importlib_resources (not installed here); it only ends up as `moduleName` in the info file.
    __module__ = "fabricated_tfds_builder"

    def _split_generators(self, dl_manager):
      del dl_manager
      return [tfds.core.SplitGenerator(name=s, gen_kwargs={"directory": d})
              for s, d in split_dirs.items()]

    def _generate_examples(self, directory):
      yield from generate(directory)

  builder = Fabricated(config=config, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return builder


def _write_ade(raw, stems):
  for stem in stems:
    grey, r = _ADE_R[stem]
    r = np.asarray(r, np.uint8)
    # One greyscale JPEG (ADE20K has some): TFDS keeps its bytes and decodes it to (H, W, 3).
    image = np.full(r.shape + ((1,) if stem == "ADE_train_00000002" else (3,)), grey, np.uint8)
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(
        os.path.join(raw, stem + ".jpg"))
    ann = np.zeros(r.shape + (3,), np.uint8)
    ann[..., 0] = r
    ann[..., 1] = np.arange(r.size).reshape(r.shape) % 7 + 1  # instance ids
    Image.fromarray(ann).save(os.path.join(raw, stem + ".png"))


def _ade_examples(directory):
  for f in sorted(os.listdir(directory)):
    if f.endswith(".jpg"):
      stem = f[:-4]
      yield stem, {"image": os.path.join(directory, f),
                   "annotation": os.path.join(directory, stem + ".png")}


def _city_examples(directory):
  for f in sorted(os.listdir(directory)):
    if f.endswith("_leftImg8bit.png"):
      image_id = f[:-len("_leftImg8bit.png")]
      yield image_id, {"image_id": image_id, "image_left": os.path.join(directory, f),
                       "segmentation_label": os.path.join(directory,
                                                         image_id + "_gtFine_labelIds.png")}


def _make_ade(tmp, data_dir, overrides=None):
  dirs = {}
  for tfds_split, prefix in (("train", "ADE_train"), ("test", "ADE_val")):
    raw = os.path.join(tmp, "raw_ade", tfds_split)
    os.makedirs(raw)
    _write_ade(raw, [s for s in _ADE_R if s.startswith(prefix)])
    dirs[tfds_split] = raw
  for path, ann in (overrides or {}).items():
    Image.fromarray(ann).save(os.path.join(dirs["train"], path))
  return _prepare("scene_parse150", data_dir, dirs, _ade_examples)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  tfds.disable_progress_bar()
  tmp = str(tmp_path_factory.mktemp("tfds"))
  data_dir = os.path.join(tmp, "tensorflow_datasets")
  _make_ade(tmp, data_dir)
  dirs = {}
  for split, tfds_split in (("train", "train"), ("val", "validation")):
    raw = os.path.join(tmp, "raw_cityscapes", split)
    os.makedirs(raw)
    for image_id, (grey, ids) in _CITY[split].items():
      ids = np.asarray(ids, np.uint8)
      Image.fromarray(np.full(ids.shape + (3,), grey, np.uint8)).save(
          os.path.join(raw, image_id + "_leftImg8bit.png"))
      Image.fromarray(ids).save(os.path.join(raw, image_id + "_gtFine_labelIds.png"))
    dirs[tfds_split] = raw
  _prepare("cityscapes", data_dir, dirs, _city_examples, config="semantic_segmentation")
  return data_dir


# ----------------------------------------------------------------------------------------------
# Tables.


def test_ade20k_instance_categories_map_to_their_150_class_names():
  table = ts.ADE20K_INSTANCE_TO_SEMANTIC
  assert len(table) == 100 and list(table) == sorted(set(table)) and table[-1] == 150
  # instanceInfo100: 1 bed, 2 windowpane, 4 person, 9 car, 26 chest of drawers, 100 flag.
  names = {k: ade20k.ADE20K_CLASSES[table[k - 1] - 1] for k in (1, 2, 4, 9, 26, 100)}
  assert names == {1: "bed", 2: "windowpane", 4: "person", 9: "car", 26: "chest of drawers",
                   100: "flag"}
  ann = np.zeros((2, 3, 3), np.uint8)
  ann[..., 0] = [[0, 1, 2], [4, 9, 100]]
  ann[..., 1] = 5  # instance ids are not classes
  out = ts.ade20k_label_from_instance_annotation(ann)
  assert out.dtype == np.uint8 and out.tolist() == [[255, 7, 8], [12, 20, 149]]
  ann[0, 0, 0] = 101
  with pytest.raises(ValueError, match="101 outside 0..100"):
    ts.ade20k_label_from_instance_annotation(ann)


def test_as_rgb():
  grey = np.arange(6, dtype=np.uint8).reshape(2, 3)
  for image in (grey, grey[..., None]):
    out = ts.as_rgb(image)
    assert out.shape == (2, 3, 3) and (out == grey[..., None]).all()
  rgba = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  np.testing.assert_array_equal(ts.as_rgb(rgba), rgba[..., :3])


# ----------------------------------------------------------------------------------------------
# Reading the prepared data.


def test_fabricated_data_is_tfds_array_record(data_dir):
  version_dir = os.path.join(data_dir, "scene_parse150", "1.0.0")
  assert sorted(os.listdir(version_dir)) == [
      "dataset_info.json", "features.json",
      "scene_parse150-test.array_record-00000-of-00001",
      "scene_parse150-train.array_record-00000-of-00001"]
  with open(os.path.join(version_dir, "dataset_info.json")) as f:
    info = json.load(f)
  assert info["fileFormat"] == "array_record" and info["version"] == "1.0.0"
  assert [(s["name"], s["shardLengths"]) for s in info["splits"]] == [
      ("train", ["3"]), ("test", ["2"])]
  city_dir = os.path.join(data_dir, "cityscapes", "semantic_segmentation", "1.0.0")
  assert "cityscapes-validation.array_record-00000-of-00001" in os.listdir(city_dir)


@pytest.mark.parametrize("split,tfds_split,greys", [
    ("train", "train", (30, 110, 190)), ("val", "test", (60, 220))])
def test_ade20k_records(data_dir, split, tfds_split, greys):
  src = ts.ade20k_tfds_source(data_dir, split)
  assert len(src) == len(greys) and src.class_names == ade20k.ADE20K_CLASSES
  seen = {}
  for i in range(len(src)):
    r = src[i]
    assert set(r) == {"image", "label", "name"}
    assert r["name"] == f"scene_parse150_{tfds_split}_{i:06d}"
    assert r["image"].dtype == np.uint8 and r["image"].ndim == 3 and r["image"].shape[2] == 3
    assert r["label"].dtype == np.uint8 and r["label"].shape == r["image"].shape[:2]
    grey = min(greys, key=lambda g: abs(g - float(r["image"].mean())))  # JPEG is near-exact
    assert abs(float(r["image"].mean()) - grey) < 3
    seen[grey] = r["label"].tolist()
  assert seen == {g: _ADE_EXPECTED[g] for g in greys}
  with pytest.raises(IndexError):
    src[len(src)]


def test_cityscapes_records(data_dir):
  for split in ("train", "val"):
    src = ts.cityscapes_tfds_source(data_dir, split)
    assert src.class_names == cityscapes.CITYSCAPES_CLASSES and len(src) == 2
    records = {r["name"]: r for r in (src[i] for i in range(len(src)))}
    assert sorted(records) == sorted(_CITY[split])
    for name, r in records.items():
      grey = _CITY[split][name][0]
      np.testing.assert_array_equal(r["image"], np.full((2, 4, 3), grey, np.uint8))
      assert r["label"].dtype == np.uint8 and r["label"].tolist() == _CITY_EXPECTED[name]


def test_get_source_grain_and_pickle(data_dir):
  cfg = support.dataset_config(name="tfds_cityscapes", root=data_dir, num_classes=19,
                               ignore_index=255)
  src = registry.get_source(cfg, "val")
  assert isinstance(src, ts.TfdsSegmentation)
  ds = grain.MapDataset.source(src).map(lambda r: (r["name"], r["label"].tolist()))
  assert sorted(ds[i] for i in range(len(ds))) == sorted(
      (n, _CITY_EXPECTED[n]) for n in _CITY["val"])
  clone = pickle.loads(pickle.dumps(src))  # grain worker processes receive a pickled source
  np.testing.assert_array_equal(clone[1]["label"], src[1]["label"])
  cfg = support.dataset_config(name="tfds_ade20k", root=data_dir, num_classes=150)
  assert len(registry.get_source(cfg, "val")) == 2
  cfg.num_classes = 151
  with pytest.raises(ValueError, match="num_classes is 151 but dataset 'tfds_ade20k' has 150"):
    registry.get_source(cfg, "val")


def test_tfds_split_strings_pass_through(data_dir):
  src = ts.ade20k_tfds_source(data_dir, "train[:2]")
  assert len(src) == 2 and src[0]["name"] == "scene_parse150_train[:2]_000000"
  with pytest.raises(ValueError, match=r"no split 'validation'.*\['train', 'test'\]"):
    ts.ade20k_tfds_source(data_dir, "validation")


# ----------------------------------------------------------------------------------------------
# Errors.


def test_missing_data_dir(tmp_path):
  missing = str(tmp_path / "nope")
  with pytest.raises(FileNotFoundError,
                     match=f"missing TFDS data_dir {re.escape(missing)}.*internet"):
    ts.ade20k_tfds_source(missing, "train")
  cfg = support.dataset_config(name="tfds_ade20k", root="")
  with pytest.raises(FileNotFoundError, match="config.dataset.root is empty"):
    registry.get_source(cfg, "train")


def test_not_prepared_names_the_directory_searched(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    ts.cityscapes_tfds_source(str(tmp_path), "train")
  message = str(e.value)
  assert os.path.join(str(tmp_path), "cityscapes", "semantic_segmentation", "1.0.0") in message
  assert "tfds build cityscapes/semantic_segmentation" in message
  assert "download_and_prepare" in message and "on a machine with internet" in message


def test_tfrecord_prepared_data_is_refused(data_dir, tmp_path):
  copy = str(tmp_path / "copy")
  shutil.copytree(os.path.join(data_dir, "scene_parse150"), os.path.join(copy, "scene_parse150"))
  info_path = os.path.join(copy, "scene_parse150", "1.0.0", "dataset_info.json")
  with open(info_path) as f:
    info = json.load(f)
  info["fileFormat"] = "tfrecord"  # what a default `tfds build` records
  with open(info_path, "w") as f:
    json.dump(info, f)
  with pytest.raises(ValueError, match="stored as tfrecord.*--file_format=array_record"):
    ts.ade20k_tfds_source(copy, "train")


def test_bad_annotation_names_the_example(tmp_path):
  bad = np.zeros((3, 4, 3), np.uint8)
  bad[0, 0, 0] = 150  # a 150-class id where the instance task allows 1..100
  data_dir = str(tmp_path / "tensorflow_datasets")
  _make_ade(str(tmp_path), data_dir, overrides={"ADE_train_00000001.png": bad})
  src = ts.ade20k_tfds_source(data_dir, "train")
  errors = []
  for i in range(len(src)):
    try:
      src[i]
    except ValueError as e:
      errors.append(str(e))
  assert len(errors) == 1
  assert "(scene_parse150_train_" in errors[0] and data_dir in errors[0]
  assert "150 outside 0..100" in errors[0]
