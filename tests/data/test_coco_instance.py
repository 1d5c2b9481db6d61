"""COCO instances (segvit_jax.data.coco_instance): a fabricated tree with polygons, compressed
and uncompressed RLE, crowd and overlapping objects read back exactly; the rasterisation against
exact polygon areas; the layered segment maps that carry overlapping instances into training."""

import json
import os

import numpy as np
import pytest
from PIL import Image, ImageDraw

from segvit_jax.data import coco_instance, registry
from segvit_jax.data import transforms as T
from tests import fabricate


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  return fabricate.write_coco_instances(str(tmp_path_factory.mktemp("data") / "coco"))


def _check_records(source, expected, drop_crowd):
  assert len(source) == len(expected)
  for i in range(len(source)):
    r = source[i]
    want = [e for e in expected[r["name"] + ".jpg"] if not (drop_crowd and e[2])]
    assert r["masks"].shape == (len(want), 48, 56) and r["masks"].dtype == bool
    for j, (mask, cls, crowd, area) in enumerate(want):
      np.testing.assert_array_equal(r["masks"][j], mask)
      assert (r["class_ids"][j], r["is_crowd"][j], r["area"][j]) == (cls, bool(crowd), area)
    assert r["is_thing"].all() and r["image"].shape == (48, 56, 3)


def test_records_read_back_exactly(tree):
  """Every mask (box polygons, a two-polygon object, compressed RLE, uncompressed crowd RLE)
  pixel for pixel, classes in the json's category order (COCO ids 1, 3, 7 -> 0, 1, 2), crowd
  dropped for training and flagged for evaluation, the image without annotations left out."""
  root, expected = tree
  train = coco_instance.coco_instance_source(root, "train")
  assert train.class_names == ("red", "green", "blue") and all(train.is_thing_class)
  assert train.categories.coco_ids == (1, 3, 7) and train.masks_overlap
  _check_records(train, expected["train2017"], drop_crowd=True)
  val = coco_instance.coco_instance_source(root, "val2017", drop_crowd=False)
  assert len(val) == 3  # the 4th listed image has no annotation
  _check_records(val, expected["val2017"], drop_crowd=False)
  assert val[0]["is_crowd"].tolist() == [False, False, False, True]
  # The objects overlap (what a segment map could not hold).
  masks = val[0]["masks"]
  assert (masks[0] & masks[1]).sum() == 16 and (masks[1] & masks[2]).any()
  # The registry builds it from config.dataset; class names come from the json.
  import ml_collections  # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict(dict(name="coco_instance", root=root, num_classes=3,
                                       drop_crowd=True, eval_split="val"))
  assert len(registry.get_source(cfg, "train")) == 6
  assert registry.class_names(cfg) == ("red", "green", "blue")
  train.check_max_segments(3)
  with pytest.raises(ValueError, match=r"has 3 instances \(crowd dropped\) in .*instances_"
                                       r"train2017.json, more than config.dataset.max_segments=2"):
    train.check_max_segments(2)


def test_polygon_rasterisation_against_exact_areas():
  """pycocotools' rasterisation (the reference of COCOeval and of the EoMT release) against
  the shoelace area: within 0.2 px on these polygons; PIL's ImageDraw.polygon (which fills the
  outline too) is 3.6% to 15.5% larger, so we use pycocotools. Box polygons with integer
  corners cover exactly [y0, y1) x [x0, x1)."""
  polygons = {"box": [10, 10, 30, 10, 30, 20, 10, 20],
              "triangle": [5.5, 3.2, 50.7, 12.9, 20.3, 45.1],
              "pentagon": [32, 4, 58, 22, 48, 54, 16, 54, 6, 22]}
  measured = {"box": (200.0, 200, 231), "triangle": (875.16, 875, 919),
              "pentagon": (1812.0, 1812, 1877)}
  for name, p in polygons.items():
    xs, ys = np.asarray(p[0::2]), np.asarray(p[1::2])
    exact = 0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1)))
    ours = coco_instance.annotation_mask([p], 64, 64)
    img = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(img).polygon(list(zip(xs, ys)), fill=1)
    pil = int(np.asarray(img).sum())
    assert (round(exact, 2), int(ours.sum()), pil) == measured[name]
    assert abs(ours.sum() - exact) < 0.2
  box = coco_instance.annotation_mask([polygons["box"]], 64, 64)
  assert box[10:20, 10:30].all() and box.sum() == 200
  # Fewer than 3 points: nothing (pycocotools would read 4 numbers as a box).
  assert not coco_instance.annotation_mask([[1, 1, 5, 5]], 8, 8).any()


def test_rle_decoding_by_hand():
  """Uncompressed RLE runs are column-major and start with 0s: counts [1, 2, 3, 6] of a 3 x 4
  mask: pixel 0 off, 1-2 on, 3-5 off, 6-11 on, read down the columns; the compressed form of
  the same mask (pycocotools' string) decodes to the same."""
  flat = np.zeros(12, bool)  # column-major order
  flat[1:3] = True
  flat[6:12] = True
  want = flat.reshape(4, 3).T
  assert want[:, 0].tolist() == [False, True, True] and want[:, 1].tolist() == [False] * 3
  got = coco_instance.annotation_mask({"size": [3, 4], "counts": [1, 2, 3, 6]}, 3, 4)
  np.testing.assert_array_equal(got, want)
  assert fabricate.uncompressed_rle(want)["counts"] == [1, 2, 3, 6]
  from pycocotools import mask as mask_util  # pylint: disable=g-import-not-at-top
  counts = mask_util.encode(np.asfortranarray(want.astype(np.uint8)))["counts"].decode()
  np.testing.assert_array_equal(
      coco_instance.annotation_mask({"size": [3, 4], "counts": counts}, 3, 4), want)
  with pytest.raises(ValueError, match=r"x.json \(a.jpg\): RLE size \[4, 3\] is not the "
                                       r"image's \[3, 4\]"):
    coco_instance.annotation_mask({"size": [4, 3], "counts": [12]}, 3, 4, "x.json (a.jpg)")
  with pytest.raises(ValueError, match="uncompressed RLE counts sum to 11, not 3 x 4 = 12"):
    coco_instance.annotation_mask({"size": [3, 4], "counts": [11]}, 3, 4)


def _edit_json(root, split, edit):
  path = os.path.join(root, "annotations", f"instances_{split}.json")
  with open(path) as f:
    data = json.load(f)
  edit(data)
  with open(path, "w") as f:
    json.dump(data, f)
  return path


def test_layout_errors_name_the_file(tmp_path):
  root, _ = fabricate.write_coco_instances(str(tmp_path / "coco"), num_train=2, num_val=1)
  with pytest.raises(FileNotFoundError, match="missing directory .*nowhere"):
    coco_instance.coco_instance_source(str(tmp_path / "nowhere"), "train")
  with pytest.raises(ValueError, match="unknown COCO instance split 'test'"):
    coco_instance.coco_instance_source(root, "test")
  os.rename(os.path.join(root, "val2017"), os.path.join(root, "v"))
  with pytest.raises(FileNotFoundError, match=r"missing directory .*val2017.*instances_"):
    coco_instance.coco_instance_source(root, "val")
  os.remove(os.path.join(root, "annotations", "instances_val2017.json"))
  with pytest.raises(FileNotFoundError, match="missing file .*instances_val2017.json"):
    coco_instance.coco_instance_source(root, "val")
  first = sorted(os.listdir(os.path.join(root, "train2017")))[0]
  os.remove(os.path.join(root, "train2017", first))
  with pytest.raises(FileNotFoundError, match=f"1 image.* missing from .*train2017, e.g. "
                                              f".*{first}"):
    coco_instance.coco_instance_source(root, "train")


def test_annotation_errors_name_the_json(tmp_path):
  root, _ = fabricate.write_coco_instances(str(tmp_path / "coco"), num_train=2, num_val=1)

  def category(data):
    data["annotations"][0]["category_id"] = 99

  path = _edit_json(root, "val2017", category)
  with pytest.raises(ValueError, match=f"{path}: annotation \\d+ has category_id 99, which is "
                                       "not in the json's categories"):
    coco_instance.coco_instance_source(root, "val")
  fabricate.write_coco_instances(root, num_train=2, num_val=1)

  def image(data):
    data["annotations"][1]["image_id"] = 1234

  path = _edit_json(root, "val2017", image)
  with pytest.raises(ValueError, match=f"{path}: annotation \\d+ names image_id 1234"):
    coco_instance.coco_instance_source(root, "val")
  fabricate.write_coco_instances(root, num_train=2, num_val=1)

  def rle_size(data):
    data["annotations"][2]["segmentation"]["size"] = [10, 10]

  path = _edit_json(root, "train2017", rle_size)
  with pytest.raises(ValueError, match=f"{path}: annotation 3 has an RLE of size \\[10, 10\\]"):
    coco_instance.coco_instance_source(root, "train")
  with open(path, "w") as f:
    f.write("{not json")
  with pytest.raises(ValueError, match=f"cannot read COCO instances json {path}"):
    coco_instance.coco_instance_source(root, "train")
  fabricate.write_coco_instances(root, num_train=2, num_val=1)
  source = coco_instance.coco_instance_source(root, "val")
  Image.new("RGB", (30, 20)).save(source.examples[0].image_path)  # not the json's 56 x 48
  with pytest.raises(ValueError, match=f"image .*is 30x20 \\(WxH\\) but {source.json_path} "
                                       "says 56x48"):
    source[0]


# ----------------------------------------------------------------------------------------------
# Layered segment maps (transforms.segment_map with mask_layers > 1).


def _hand_masks():
  m = np.zeros((4, 4, 6), bool)
  m[0, 0:2, 0:4] = True  # A
  m[1, 1:3, 2:6] = True  # B overlaps A on row 1, columns 2-3
  m[2, 3, :] = True  # C overlaps nothing
  m[3, 1:3, 3:5] = True  # D overlaps A (1 px in layer 0) and B (4 px in layer 1)
  return m


def test_layered_segment_map_holds_overlapping_masks(caplog, monkeypatch):
  """Each mask in the first layer where it overlaps nothing, so the union per index over the
  layers gives the masks back exactly; one layer is today's map (later masks take the
  overlap); a mask that fits no layer goes where it overlaps least and takes those pixels."""
  m = _hand_masks()
  label, classes = T.segment_map(m[:3], np.array([4, 5, 6]), 5, 255, mask_layers=2)
  assert label.shape == (4, 6, 2) and label.dtype == np.int32
  assert classes.tolist() == [4, 5, 6, -1, -1]
  assert (label[..., 1] == 1).sum() == 8 and (label[..., 0] == 1).sum() == 0  # B in layer 1
  for k in range(3):
    np.testing.assert_array_equal((label == k).any(-1), m[k])
  one, classes1 = T.segment_map(m[:3], np.array([4, 5, 6]), 5, 255)
  assert one.shape == (4, 6) and classes1.tolist() == classes.tolist()
  np.testing.assert_array_equal(one == 0, m[0] & ~m[1])  # A lost its overlap with B
  # D: 1 px of overlap in layer 0 against 4 in layer 1 -> layer 0; A loses that pixel (and
  # the first such example of a process is logged).
  monkeypatch.setattr(T, "_LAYERS_WARNED", [])
  with caplog.at_level("WARNING"):
    label, _ = T.segment_map(m, np.array([4, 5, 6, 7]), 5, 255, "img7", mask_layers=2)
  assert "img7: instance 3 overlaps others in all 2 mask layers; it takes 1 of their" in (
      caplog.text)
  np.testing.assert_array_equal(label[..., 0] == 3, m[3])
  np.testing.assert_array_equal((label == 0).any(-1), m[0] & ~m[3])
  for k in (1, 2):
    np.testing.assert_array_equal((label == k).any(-1), m[k])
  with pytest.raises(ValueError, match="mask_layers=0 must be at least 1"):
    T.segment_map(m, np.array([4, 5, 6, 7]), 5, 255, mask_layers=0)


def test_geometric_augmentation_moves_every_layer_as_a_single_map():
  """Flip, scale jitter (nearest), pad and crop on an (H, W, L) label equal the same draws on
  each layer alone."""
  rng = np.random.default_rng(0)
  masks = rng.random((6, 30, 40)) < 0.2
  label, classes = T.segment_map(masks, np.arange(6), 8, 255, mask_layers=3)
  image = rng.integers(0, 255, (30, 40, 3)).astype(np.uint8)
  ops = [T.RandomFlip(prob=0.5), T.ScaleJitter(target_size=(48, 48), scale_range=(0.5, 1.5)),
         T.Pad(size=(48, 48), pad_value=0, label_pad_value=255),
         T.RandomCrop(crop_size=(48, 48), cat_max_ratio=1.0, ignore_index=255)]

  def run(lab, seed):
    record, r = {"image": image, "label": lab}, np.random.default_rng(seed)
    for op in ops:
      record = (op.random_map(record, r) if hasattr(op, "random_map") else op.map(record))
    return record["label"]

  for seed in range(4):
    out = run(label, seed)
    assert out.shape == (48, 48, 3)
    for layer in range(3):
      np.testing.assert_array_equal(out[..., layer], run(label[..., layer], seed))
  assert T.segments_present(label, 8).tolist() == [True] * 6 + [False] * 2
