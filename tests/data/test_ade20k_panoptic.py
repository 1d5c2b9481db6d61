"""Tests for segvit_jax.data.ade20k_panoptic on miniature ADEChallengeData2016 trees written here:
the EoMT release's semantic + instance pngs read back exactly, Mask2Former's json (written from
them by fabricate's copy of its converter) giving the same records, and one clear error per
bad layout."""

import json
import os
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from segvit_jax.data import ade20k, ade20k_panoptic as ap, coco_panoptic, pipeline, registry
from tests import fabricate, support

# Semantic pngs (class + 1, 0 = other) and instance pngs (R category 1..100, G instance id).
# Image 1: person instance 1 covers a wall pixel, (1, 3) (things are painted over stuff);
# person instance 2 covers all of the sky (dropped); the car (class 20) has no instance (void).
WALL, SKY, FLOOR, PERSON, CAR, BUILDING = 1, 3, 4, 13, 21, 2  # semantic values
_SEMANTIC = {
    "ADE_train_00000001": [[WALL, WALL, WALL, WALL, SKY, 0],
                           [WALL, PERSON, PERSON, WALL, SKY, SKY],
                           [FLOOR, PERSON, PERSON, FLOOR, CAR, CAR],
                           [FLOOR, FLOOR, FLOOR, FLOOR, CAR, CAR]],
    "ADE_train_00000002": [[BUILDING] * 5, [BUILDING] * 5, [0] * 5],
    "ADE_val_00000001": [[150, 150], [150, 150]],
}
_P = (4, 1)  # person: instance category 4 (-> class 12), instance 1
_Q = (4, 2)  # person, instance 2
_FLAG = (100, 7)  # flag: instance category 100 (-> class 149), instance 7
_O = (0, 0)
_INSTANCE = {
    "ADE_train_00000001": [[_O, _O, _O, _O, _Q, _O],
                           [_O, _P, _P, _P, _Q, _Q],
                           [_O, _P, _P, _O, _O, _O],
                           [_O, _O, _O, _O, _O, _O]],
    "ADE_train_00000002": [[_O] * 5] * 3,
    "ADE_val_00000001": [[_FLAG, _FLAG], [_FLAG, _FLAG]],
}
_GREY = {"ADE_train_00000001": 40, "ADE_train_00000002": 130, "ADE_val_00000001": 220}


def _instance_png(pairs):
  rg = np.asarray(pairs, np.uint8)
  return np.concatenate([rg, np.zeros(rg.shape[:-1] + (1,), np.uint8)], axis=-1)


def _make_ade(root, instances_beside=False):
  """The three images above in the release's layout; returns root (ADEChallengeData2016)."""
  instance_root = os.path.join(os.path.dirname(root) if instances_beside else root,
                               "annotations_instance")
  for stem, semantic in _SEMANTIC.items():
    split = "training" if "train" in stem else "validation"
    semantic = np.asarray(semantic, np.uint8)
    for d in (f"{root}/images/{split}", f"{root}/annotations/{split}",
              f"{instance_root}/{split}"):
      os.makedirs(d, exist_ok=True)
    Image.fromarray(np.full(semantic.shape + (3,), _GREY[stem], np.uint8)).save(
        f"{root}/images/{split}/{stem}.jpg")
    Image.fromarray(semantic, mode="L").save(f"{root}/annotations/{split}/{stem}.png")
    Image.fromarray(_instance_png(_INSTANCE[stem])).save(f"{instance_root}/{split}/{stem}.png")
  return str(root)


@pytest.fixture
def root(tmp_path):
  return _make_ade(str(tmp_path / "ADEChallengeData2016"))


def _where(stem, table, value):
  return np.asarray([[cell == value for cell in row] for row in table[stem]])


def _records(src):
  return [src[i] for i in range(len(src))]


# ----------------------------------------------------------------------------------------------
# The release's pngs, read back exactly.


def test_categories_are_the_release_split():
  assert ap.CATEGORIES.names == ade20k.ADE20K_CLASSES
  assert ap.CATEGORIES.coco_ids == tuple(range(150))
  assert len(ap.CATEGORIES.thing_classes) == 100
  # The release's configs/dinov2/ade20k/panoptic/*.yaml stuff_classes, as written there.
  assert ap.STUFF_CLASSES == (
      0, 1, 2, 3, 4, 5, 6, 9, 11, 13, 16, 17, 21, 25, 26, 28, 29, 34, 40, 46, 48, 51, 52, 54, 59,
      60, 61, 63, 68, 77, 79, 84, 91, 94, 96, 99, 100, 101, 105, 106, 109, 113, 114, 117, 122,
      128, 131, 140, 141, 145)
  assert ap.CATEGORIES.thing_classes[:3] == ("bed", "windowpane", "cabinet")
  assert ap.INSTANCE_TO_CLASS[3] == ade20k.ADE20K_CLASSES.index("person") == 12


def test_release_pngs_read_back_exactly(root):
  src = ap.ade20k_panoptic_source(root, "train")
  assert isinstance(src, ap.Ade20kPanopticPngs) and len(src) == 2
  r = src[0]
  assert set(r) == {"image", "masks", "class_ids", "is_thing", "is_crowd", "name"}
  assert r["name"] == "ADE_train_00000001"
  assert r["image"].shape == (4, 6, 3) and abs(float(r["image"].mean()) - 40) < 3  # JPEG
  # Stuff by class (wall, floor; the sky wholly under instance 2 is gone), then the instances.
  assert r["class_ids"].dtype == np.int32 and r["class_ids"].tolist() == [0, 3, 12, 12]
  assert r["is_thing"].tolist() == [False, False, True, True] and not r["is_crowd"].any()
  stem = "ADE_train_00000001"
  wall = _where(stem, _SEMANTIC, WALL)
  wall[1, 3] = False  # under person instance 1
  for mask, want in zip(r["masks"], (wall, _where(stem, _SEMANTIC, FLOOR),
                                     _where(stem, _INSTANCE, _P), _where(stem, _INSTANCE, _Q))):
    np.testing.assert_array_equal(mask, want)
  # "other" and the car without an instance are void.
  assert coco_panoptic.semantic_label(r).tolist() == [[0, 0, 0, 0, 12, 255],
                                                      [0, 12, 12, 12, 12, 12],
                                                      [3, 12, 12, 3, 255, 255],
                                                      [3, 3, 3, 3, 255, 255]]
  r = src[1]
  assert (r["name"], r["class_ids"].tolist(), r["masks"].shape) == (
      "ADE_train_00000002", [1], (1, 3, 5))
  np.testing.assert_array_equal(r["masks"][0], _where("ADE_train_00000002", _SEMANTIC, BUILDING))
  r = ap.ade20k_panoptic_source(root, "validation")[0]
  assert r["class_ids"].tolist() == [149] and r["is_thing"].tolist() == [True]
  assert r["masks"].all()


def test_instances_beside_root(tmp_path):
  root = _make_ade(str(tmp_path / "ADEChallengeData2016"), instances_beside=True)
  assert os.path.isdir(tmp_path / "annotations_instance" / "training")
  r = ap.ade20k_panoptic_source(root, "train")[0]
  assert r["class_ids"].tolist() == [0, 3, 12, 12]


# ----------------------------------------------------------------------------------------------
# Mask2Former's json: the same records.


def test_mask2former_json_gives_the_same_records(root):
  fabricate.ade20k_panoptic_json(root)
  for split in ("train", "val"):
    from_json = ap.ade20k_panoptic_source(root, split)
    assert isinstance(from_json, coco_panoptic.CocoPanoptic)
    # Mask2Former lists the covered sky segment; its png has no pixel of it.
    with open(os.path.join(root, f"ade20k_panoptic_{split}.json")) as f:
      listed = [len(a["segments_info"]) for a in json.load(f)["annotations"]]
    assert listed == ([5, 1] if split == "train" else [1])
    assert from_json.class_names == ade20k.ADE20K_CLASSES  # ours, not the json's names
    assert from_json.categories == ap.CATEGORIES
    json_records = _records(from_json)
    os.rename(os.path.join(root, f"ade20k_panoptic_{split}.json"), os.path.join(root, "x.json"))
    png_records = _records(ap.ade20k_panoptic_source(root, split))
    os.rename(os.path.join(root, "x.json"), os.path.join(root, f"ade20k_panoptic_{split}.json"))
    assert len(json_records) == len(png_records)
    for a, b in zip(json_records, png_records):
      assert a["name"] == b["name"]
      for key in ("image", "masks", "class_ids", "is_thing", "is_crowd"):
        assert a[key].dtype == b[key].dtype, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_fabricated_copies_agree_in_both_layouts(tmp_path):
  """The synthetic-scene miniature (overlapping annotations, instances without a semantic
  match, void things) in both layouts: identical records."""
  root = fabricate.write_ade20k_panoptic(str(tmp_path / "ADEChallengeData2016"), num_train=6,
                                         num_val=1, m2f_json=True)
  from_json = _records(ap.ade20k_panoptic_source(root, "train"))
  os.remove(os.path.join(root, "ade20k_panoptic_train.json"))
  from_pngs = _records(ap.ade20k_panoptic_source(root, "train"))
  assert sum(len(r["class_ids"]) for r in from_pngs) > 2 * len(from_pngs)
  for a, b in zip(from_json, from_pngs):
    assert a["class_ids"].tolist() == b["class_ids"].tolist()
    np.testing.assert_array_equal(a["masks"], b["masks"])


# ----------------------------------------------------------------------------------------------
# The registry and the pipelines.


def test_registry_class_names_and_count(root):
  cfg = support.dataset_config(name="ade20k_panoptic", root="/nonexistent", num_classes=150)
  assert registry.class_names(cfg) == ade20k.ADE20K_CLASSES  # no data read
  cfg.root = root
  src = registry.get_source(cfg, "val")
  assert len(src) == 1 and src.categories.thing_classes == ap.CATEGORIES.thing_classes
  cfg.num_classes = 133
  with pytest.raises(ValueError, match="num_classes is 133 but dataset 'ade20k_panoptic' has 150"):
    registry.get_source(cfg, "train")
  cfg.root = ""
  with pytest.raises(FileNotFoundError, match="config.dataset.root is empty; set it to the "
                                              "ADEChallengeData2016 directory"):
    registry.get_source(cfg, "train")


def test_panoptic_pipelines_read_it(tmp_path):
  """The smoke config of configs/eomt_vit_l_ade20k_panoptic.py on the fabricated copy: a
  training batch of segment-index maps and the panoptic evaluation's ground truth."""
  from configs import eomt_vit_l_ade20k_panoptic  # pylint: disable=g-import-not-at-top
  root = fabricate.write_ade20k_panoptic(str(tmp_path / "ADEChallengeData2016"), num_train=4,
                                         num_val=2, size=64)
  c = eomt_vit_l_ade20k_panoptic.get_config("smoke")
  c.dataset.root = root
  assert pipeline.is_panoptic(c)
  batch = next(iter(pipeline.make_train_dataset(c, 0, 1)))
  assert batch["image"].shape == (2, 64, 64, 3) and batch["label"].shape == (2, 64, 64)
  assert batch["segment_classes"].shape == (2, 255)
  classes = batch["segment_classes"][batch["segment_classes"] >= 0]
  assert set(classes.tolist()) <= set(range(150)) and {0, 3} & set(classes.tolist())
  ds, categories = pipeline.make_panoptic_eval_dataset(c)
  assert categories == ap.CATEGORIES and len(ds) == 2
  ex, record = ds[0], ap.ade20k_panoptic_source(root, "val")[0]
  assert ex["segment_classes"].tolist() == record["class_ids"].tolist()
  assert (ex["segments"] > 0).sum() == record["masks"].sum()


def test_dataset_check_counts_the_class_map_and_lists_bad_pngs(root):
  """`python -m segvit_jax.data.check`'s `check_source`: every record's class-id map counted
  (image 1: wall 5, floor 6, person 8, void 5; image 2: building 10, void 5), a png naming an
  instance of two categories listed as bad with its reason."""
  from segvit_jax.data import check  # pylint: disable=g-import-not-at-top
  src = ap.ade20k_panoptic_source(root, "train")
  report = check.check_source(src, progress=False, split="train")
  assert report.ok and (report.num_examples, report.num_pixels, report.num_ignored) == (2, 39, 10)
  assert {ade20k.ADE20K_CLASSES[k]: int(n) for k, n in enumerate(report.class_pixels) if n} == {
      "wall": 5, "building": 10, "floor": 6, "person": 8}
  assert report.class_images[12] == 1
  path = os.path.join(root, "annotations_instance", "training", "ADE_train_00000002.png")
  Image.fromarray(_instance_png([[(4, 1)] * 5, [(5, 1)] * 5, [_O] * 5])).save(path)
  report = check.check_source(src, progress=False)
  assert [name for name, _ in report.bad] == [src.pairs[1][0]]
  assert re.search(f"instance 1 of {re.escape(path)} has category\\(ies\\) 4, 5",
                   report.bad[0][1])


class _Oracle:
  """A "model" whose class and mask logits are the ground truth of one image (params = them)."""

  def apply(self, params, x):
    b = x.shape[0]
    return {k: jnp.broadcast_to(v, (b,) + v.shape[1:]) for k, v in params.items()}


def test_panoptic_evaluation_of_the_ground_truth_scores_100(tmp_path):
  """The panoptic evaluation (PQ with the 100 thing / 50 stuff flags, and the things' mask AP)
  of predictions equal to the fabricated copy's ground truth (one 64 px validation image): 100
  everywhere it has segments, NaN for the 146 classes it has not."""
  from configs import eomt_vit_l_ade20k_panoptic  # pylint: disable=g-import-not-at-top
  from segvit_jax.evaluation import panoptic  # pylint: disable=g-import-not-at-top
  root = fabricate.write_ade20k_panoptic(str(tmp_path / "ADEChallengeData2016"), num_train=1,
                                         num_val=1, size=64)
  c = eomt_vit_l_ade20k_panoptic.get_config("smoke")
  c.dataset.root = root
  record = ap.ade20k_panoptic_source(root, "val")[0]
  n, q = len(record["class_ids"]), len(record["class_ids"]) + 2
  assert record["is_thing"].any() and not record["is_thing"].all()
  classes = np.full((1, q, 151), -20.0, np.float32)
  classes[0, np.arange(n), record["class_ids"]] = 20.0
  classes[0, n:, 150] = 20.0  # no object
  masks = np.full((1, q, 64, 64), -20.0, np.float32)
  masks[0, :n][record["masks"]] = 20.0
  params = {"class_logits": jnp.asarray(classes), "mask_logits": jnp.asarray(masks)}
  results = panoptic.evaluate(_Oracle(), params, c, split="val")
  assert (results["PQ"], results["PQ_th"], results["PQ_st"]) == (100.0, 100.0, 100.0)
  assert results["AP"] == pytest.approx(100.0, abs=1e-9)  # COCOeval's float sums: 100 - 3e-14
  per_class = results["per_class"]
  assert [r["name"] for r in per_class] == list(ade20k.ADE20K_CLASSES)
  assert sum(r["isthing"] for r in per_class) == 100
  scored = {r["name"] for r in per_class if not np.isnan(r["PQ"])}
  assert scored == {ade20k.ADE20K_CLASSES[k] for k in record["class_ids"]}


# ----------------------------------------------------------------------------------------------
# Errors.


def test_missing_root_annotations_and_split(tmp_path, root):
  with pytest.raises(ValueError, match="unknown ADE20K panoptic split 'test'"):
    ap.ade20k_panoptic_source(root, "test")
  with pytest.raises(FileNotFoundError, match=f"missing directory {re.escape(str(tmp_path))}/nope"):
    ap.ade20k_panoptic_source(str(tmp_path / "nope"), "train")
  shutil.rmtree(os.path.join(root, "annotations_instance"))
  json_path = os.path.join(root, "ade20k_panoptic_train.json")
  with pytest.raises(FileNotFoundError,
                     match=f"found neither {re.escape(json_path)} nor an instance annotation "
                           f"directory \\({re.escape(root)}/annotations_instance/training or "
                           ".*expected layout: root = ADEChallengeData2016 with"):
    ap.ade20k_panoptic_source(root, "train")


def test_missing_semantic_or_instance_png(root):
  instance = os.path.join(root, "annotations_instance", "training", "ADE_train_00000002.png")
  os.remove(instance)
  with pytest.raises(FileNotFoundError, match=f"1 image\\(s\\) of .*images/training have no "
                                              f"instance png in .*, e.g. {re.escape(instance)}"):
    ap.ade20k_panoptic_source(root, "train")
  semantic = os.path.join(root, "annotations", "validation", "ADE_val_00000001.png")
  os.remove(semantic)
  with pytest.raises(FileNotFoundError, match=f"have no label file, e.g. {re.escape(semantic)}"):
    ap.ade20k_panoptic_source(root, "val")


def test_bad_instance_pngs_name_the_file(root):
  path = os.path.join(root, "annotations_instance", "validation", "ADE_val_00000001.png")
  for pairs, message in (([[(100, 7), (99, 7)], [(100, 7), (100, 7)]],
                          "instance 7 of .* has category\\(ies\\) 99, 100 in its R channel"),
                         ([[(101, 7), (101, 7)], [(101, 7), (101, 7)]],
                          "category\\(ies\\) 101 in its R channel; expected one of 1..100")):
    Image.fromarray(_instance_png(pairs)).save(path)
    with pytest.raises(ValueError, match=message):
      ap.ade20k_panoptic_source(root, "val")[0]
  Image.fromarray(np.zeros((2, 2), np.uint8), mode="L").save(path)
  with pytest.raises(ValueError, match=f"cannot decode instance png {re.escape(path)}: expected "
                                       "an RGB instance png"):
    ap.ade20k_panoptic_source(root, "val")[0]
  Image.fromarray(np.zeros((3, 2, 3), np.uint8)).save(path)
  with pytest.raises(ValueError, match=f"{re.escape(path)} is 2x3 \\(WxH\\) but image .* is 2x2"):
    ap.ade20k_panoptic_source(root, "val")[0]
  semantic = os.path.join(root, "annotations", "validation", "ADE_val_00000001.png")
  Image.fromarray(np.array([[0, 151], [200, 3]], np.uint8), mode="L").save(semantic)
  with pytest.raises(ValueError, match=f"semantic png {re.escape(semantic)} has value\\(s\\) "
                                       "151, 200; expected 0 \\(other\\) and 1..150"):
    ap.ade20k_panoptic_source(root, "val")[0]


def test_mask2former_json_errors(root):
  fabricate.ade20k_panoptic_json(root)
  png = os.path.join(root, "ade20k_panoptic_train", "ADE_train_00000002.png")
  os.remove(png)
  with pytest.raises(FileNotFoundError, match=f"1 file\\(s\\) named by .*ade20k_panoptic_train"
                                              f".json are missing from .*, e.g. {re.escape(png)}"):
    ap.ade20k_panoptic_source(root, "train")
  json_path = os.path.join(root, "ade20k_panoptic_val.json")
  with open(json_path) as f:
    data = json.load(f)
  data["categories"] = fabricate.coco_categories()
  with open(json_path, "w") as f:
    json.dump(data, f)
  with pytest.raises(ValueError, match=f"{re.escape(json_path)} lists 6 categories \\(ids 1, 2, "
                                       "3, 4, 5, 200, thing ids 1, 2, 3, 4, 5\\); ADE20K "
                                       "panoptic has 150 \\(ids 0, 1, "):
    ap.ade20k_panoptic_source(root, "val")
