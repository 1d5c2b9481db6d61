"""Panoptic training (COCO panoptic, EoMT): segment-index targets from records (crowd dropped,
segments the augmentation removes invalid), the "eomt" pipeline on a fabricated COCO panoptic
copy, the Mask2Former loss on segments against the semantic one and under permutation and
padding of the segments, the accumulation normalisers, the paper configs, and a small EoMT
trained through `trainer.train` and through `train.py` with the ViT-L COCO config shrunk."""

import dataclasses
import functools
import importlib
import json
import os
import re

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import eomt_vit_l_ade20k, eomt_vit_l_coco_panoptic
from segvit_jax import checkpoint, trainer
from segvit_jax.data import coco_panoptic, pipeline
from segvit_jax.data import transforms as T
from segvit_jax.losses import LOSSES
from segvit_jax.losses import mask_classification as mc
from tests import fabricate
from tests.support import read_metrics, run

NUM_CLASSES = 6  # fabricate: 5 thing shapes, 1 stuff background
_jit = jax.jit  # eager calls compile op by op: much slower than one program per call
# The Mask2Former loss options of the EoMT configs (config.loss) besides the point count.
M2F = dict(oversample_ratio=3.0, importance_ratio=0.75, no_object_weight=0.1, class_weight=2.0,
           mask_weight=5.0, dice_weight=5.0)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
  """A fabricated COCO panoptic copy at 32 px; the last object of every 2nd image is crowd."""
  return fabricate.write_coco_panoptic(str(tmp_path_factory.mktemp("data") / "coco"),
                                       num_train=8, num_val=2, size=32, crowd_every=2)


def panoptic_config(root, **overrides):
  """The COCO panoptic recipe on the fabricated copy (6 classes, 32 px crops)."""
  c = eomt_vit_l_coco_panoptic.get_config()
  c.dataset.update(root=root, num_classes=NUM_CLASSES, num_workers=0)
  c.model.num_classes = NUM_CLASSES
  c.augment.crop_size = (32, 32)
  c.batch_size = 4
  c.update_from_flattened_dict(overrides)
  return c


def apply(ops, record, seed=0):
  rng = np.random.default_rng(seed)
  for op in ops:
    record = (op.random_map(record, rng) if isinstance(op, grain.transforms.RandomMap)
              else op.map(record))
  return record


# ----------------------------------------------------------------------------------------------
# Targets.


def test_segment_map_from_hand_made_masks():
  masks = np.zeros((3, 4, 6), bool)
  masks[0, 2:] = True  # stuff: the bottom half
  masks[1, :2, :2] = True
  masks[2, :2, 2:4] = True  # the top-right 2x2 block is void
  label, classes = T.segment_map(masks, np.array([7, 0, 3]), max_segments=5, ignore_index=255)
  assert label.dtype == classes.dtype == np.int32
  np.testing.assert_array_equal(label, [[1, 1, 2, 2, 255, 255],
                                        [1, 1, 2, 2, 255, 255],
                                        [0, 0, 0, 0, 0, 0],
                                        [0, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(classes, [7, 0, 3, -1, -1])
  with pytest.raises(ValueError, match=r"000000000139 has 3 segments \(crowd dropped\), more "
                                       r"than config.dataset.max_segments=2; raise it"):
    T.segment_map(masks, np.array([7, 0, 3]), 2, 255, name="000000000139")
  with pytest.raises(ValueError, match="ignore_index 255 is a valid segment index with "
                                       "max_segments=300"):
    T.segment_map(masks, np.array([7, 0, 3]), 300, 255)
  # A crop that keeps only the left two columns leaves segments 0 and 1: 2 vanishes.
  np.testing.assert_array_equal(T.drop_vanished_segments(label[:, :2], classes),
                                [7, 0, -1, -1, -1])


_CALLS = []


@dataclasses.dataclass(frozen=True)
class _WipeHalfTheTime(grain.transforms.RandomMap):
  """Test op: with probability 0.5 the crop removes every segment (label all ignore)."""

  def random_map(self, record, rng):
    _CALLS.append(1)
    if rng.random() < 0.5:
      return {**record, "label": np.full_like(record["label"], 255)}
    return record


def test_augment_redraws_until_a_segment_is_left():
  label, classes = T.segment_map(np.ones((1, 4, 4), bool), np.array([3]), 4, 255)
  record = {"image": np.zeros((4, 4, 3), np.uint8), "label": label, "segment_classes": classes}
  augment = T.PanopticAugment(ops=(_WipeHalfTheTime(),))
  tries = []
  for seed in range(8):
    _CALLS.clear()
    out = augment.random_map(record, np.random.default_rng(seed))
    tries.append(len(_CALLS))
    np.testing.assert_array_equal(out["segment_classes"], [3, -1, -1, -1])
    np.testing.assert_array_equal(out["label"], label)
  # Each try draws once: the first draw >= 0.5 ends the redraws.
  expected = [int(np.argmax(np.random.default_rng(seed).random(10) >= 0.5)) + 1
              for seed in range(8)]
  assert tries == expected == [1, 1, 3, 3, 1, 1, 1, 1]
  # Every try wiped: the last draw is kept, without segments.
  out = T.PanopticAugment(ops=(_WipeHalfTheTime(),), max_tries=2).random_map(
      record, np.random.default_rng(2))
  assert (out["segment_classes"] == -1).all() and (out["label"] == 255).all()
  # An example without segments is augmented once.
  _CALLS.clear()
  empty = {**record, "segment_classes": np.full(4, -1, np.int32)}
  T.PanopticAugment(ops=(_WipeHalfTheTime(),)).random_map(empty, np.random.default_rng(0))
  assert len(_CALLS) == 1


def _crowd_mask(root, index):
  """The crowd pixels of train image `index` (sorted by name) of a fabricated copy."""
  with open(os.path.join(root, "annotations", "panoptic_train2017.json")) as f:
    data = json.load(f)
  annotation = sorted(data["annotations"], key=lambda a: a["file_name"])[index]
  ids = coco_panoptic.read_panoptic_png(os.path.join(
      root, "annotations", "panoptic_train2017", annotation["file_name"]))
  crowd = [s["id"] for s in annotation["segments_info"] if s["iscrowd"]]
  return np.isin(ids, crowd)


def test_train_transforms_keep_classes_and_drop_crowd(coco):
  # Scale factor 1 (32 px images, 32 px crop) and no flip: the geometry is the identity.
  c = panoptic_config(coco, **{"augment.scale_jitter": (1.0, 1.0), "augment.flip_prob": 0.0})
  ops = pipeline.train_transforms(c)
  assert [type(op).__name__ for op in ops] == ["PanopticTargets", "PanopticAugment",
                                               "Normalize", "Format"]  # no colour jitter
  source = coco_panoptic.coco_panoptic_source(coco, "train")
  with_crowd = coco_panoptic.coco_panoptic_source(coco, "train", drop_crowd=False)
  for index in (0, 1):  # image 0 has a crowd object, image 1 none (crowd_every=2)
    record = source[index]
    out = apply(ops, record)
    # A source that keeps crowd segments (flagged is_crowd) gives the same targets.
    for k, v in apply(ops, with_crowd[index]).items():
      np.testing.assert_array_equal(v, out[k], err_msg=k)
    assert set(out) == {"image", "label", "segment_classes"}
    label, classes = out["label"], out["segment_classes"]
    assert label.dtype == classes.dtype == np.int32 and classes.shape == (100,)
    n = len(record["class_ids"])
    np.testing.assert_array_equal(classes[:n], record["class_ids"])
    assert (classes[n:] == -1).all()
    # The class of each pixel's segment is the record's semantic label; crowd pixels ignored.
    by_segment = np.where(label == 255, 255, classes[np.minimum(label, 99)])
    np.testing.assert_array_equal(by_segment, coco_panoptic.semantic_label(record))
    crowd = _crowd_mask(coco, index)
    assert crowd.any() == (index == 0)
    assert (label[crowd] == 255).all() and (label[~crowd] != 255).all()


def test_pipeline_batches_on_fabricated_coco(coco):
  c = panoptic_config(coco)  # the recipe's jitter 0.1-2.0 and flip
  assert pipeline.train_batch_spec(c) == {"image": ((32, 32, 3), np.float32),
                                          "label": ((32, 32), np.int32),
                                          "segment_classes": ((100,), np.int32)}
  a, b = pipeline.make_train_iterator(c, 0, 1), pipeline.make_train_iterator(c, 0, 1)
  kept = 0
  for _ in range(8):  # 4 epochs of the 8 images
    batch, again = next(a), next(b)
    for k in batch:
      np.testing.assert_array_equal(batch[k], again[k])  # seeded
    assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (4, 32, 32) and batch["label"].dtype == np.int32
    assert batch["segment_classes"].shape == (4, 100)
    assert batch["segment_classes"].dtype == np.int32
    for label, classes in zip(batch["label"], batch["segment_classes"]):
      present = set(np.unique(label).tolist()) - {255}
      assert present == set(np.flatnonzero(classes >= 0).tolist())  # valid == has pixels
      assert ((classes >= -1) & (classes < NUM_CLASSES)).all()
      kept += len(present)
  source = coco_panoptic.coco_panoptic_source(coco, "train")
  total = 4 * sum(len(source[i]["class_ids"]) for i in range(len(source)))
  assert 0.8 * total < kept < total, (kept, total)  # scaled or cropped away: 66 of 68 kept


def test_max_segments_is_checked_before_reading_images(coco):
  source = coco_panoptic.coco_panoptic_source(coco, "train")
  most = max(len(ex.segment_ids) for ex in source.examples)  # crowd dropped
  c = panoptic_config(coco, **{"dataset.max_segments": most - 1})
  with pytest.raises(ValueError, match=f"panoptic png .*panoptic_train2017/.*\\.png has {most} "
                                       f"segments \\(crowd dropped\\) in .*panoptic_train2017"
                                       f"\\.json, more than config.dataset.max_segments="
                                       f"{most - 1} .*raise it to at least {most}"):
    pipeline.make_train_iterator(c, 0, 1)
  c.dataset.max_segments = most
  next(pipeline.make_train_iterator(c, 0, 1))


def test_loss_and_data_must_match(coco):
  c = panoptic_config(coco, **{"loss.name": "mask2former"})
  with pytest.raises(ValueError, match="dataset 'coco_panoptic' trains on segment-index maps: "
                                       "config.loss.name must be a panoptic loss"):
    pipeline.train_batch_spec(c)
  c = panoptic_config(coco, **{"augment.pipeline": "segvit"})
  with pytest.raises(ValueError, match="trains with config.augment.pipeline='eomt'"):
    pipeline.make_train_iterator(c, 0, 1)
  c = panoptic_config(coco, **{"dataset.max_segments": 0})
  with pytest.raises(ValueError, match="set config.dataset.max_segments"):
    pipeline.train_batch_spec(c)
  c = eomt_vit_l_ade20k.get_config()
  c.loss.name = "mask2former_panoptic"
  with pytest.raises(ValueError, match=r"'mask2former_panoptic' needs the batch entries "
                                       r"\['segment_classes'\], which dataset 'ade20k' does not"):
    pipeline.train_batch_spec(c)


# ----------------------------------------------------------------------------------------------
# Loss.


def _semantic_case(seed=6):
  """Random outputs (final + 2 auxiliary, Q=8, K=5) and a (2, 32, 32) label map with ignore
  rows; class 3 is absent from image 1."""
  rng = np.random.default_rng(seed)
  b, q, k, h, w, size = 2, 8, 5, 8, 8, 32

  def out():
    return {"class_logits": jnp.asarray(rng.normal(size=(b, q, k + 1)), jnp.float32),
            "mask_logits": jnp.asarray(3 * rng.normal(size=(b, q, h, w)), jnp.float32)}

  outputs = out()
  outputs["aux_outputs"] = [out(), out()]
  labels = rng.integers(0, k, (b, size, size))
  labels[:, :6] = 255
  labels[1][labels[1] == 3] = 1
  return outputs, labels, k


def test_panoptic_loss_equals_semantic_loss_with_one_segment_per_class():
  """Segment k = all pixels of class k: the panoptic loss (through the registry, as the
  trainer calls it) equals the semantic one with the same rng, every term; the segments of
  absent classes (class 3 in image 1) are no targets."""
  outputs, labels, k = _semantic_case()
  segment_classes = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (2, k))
  options = dict(num_queries=8, num_points=300, mask_normalizer="valid_targets", **M2F)
  panoptic, semantic = LOSSES["mask2former_panoptic"], LOSSES["mask2former"]
  assert panoptic.batch_keys == ("segment_classes",) and panoptic.needs_rng

  def pan(o):
    return panoptic.fn(o, jnp.asarray(labels), num_classes=k, ignore_index=255,
                       rng=jax.random.key(3), segment_classes=segment_classes, **options)

  def sem(o):
    return semantic.fn(o, jnp.asarray(labels), num_classes=k, ignore_index=255,
                       rng=jax.random.key(3), **options)

  p_loss, p_terms = _jit(pan)(outputs)
  s_loss, s_terms = _jit(sem)(outputs)
  assert len(p_terms) == 9 and p_terms.keys() == s_terms.keys()
  np.testing.assert_allclose(float(p_loss), float(s_loss), rtol=1e-6)
  for name in s_terms:
    np.testing.assert_allclose(float(p_terms[name]), float(s_terms[name]), rtol=1e-6,
                               err_msg=name)
  _, _, valid = _jit(mc.panoptic_targets)(jnp.asarray(labels), segment_classes, 255)
  np.testing.assert_array_equal(valid, [[1, 1, 1, 1, 1], [1, 1, 1, 0, 1]])
  counts = _jit(lambda x, c: panoptic.normalisers(x, k, 255, options, segment_classes=c))(
      jnp.asarray(labels), segment_classes)
  expected = _jit(lambda x: semantic.normalisers(x, k, 255, options))(jnp.asarray(labels))
  assert {n: float(v) for n, v in counts.items()} == {n: float(v) for n, v in expected.items()}
  assert float(counts["masks"]) == 9.0  # 5 + 4 segments
  with pytest.raises(ValueError, match="num_queries=9, the model gives 8 queries"):
    mc.mask2former_panoptic_loss(outputs, labels, segment_classes=segment_classes,
                                 num_classes=k, ignore_index=255, rng=jax.random.key(0),
                                 num_queries=9, num_points=300, **M2F)


def _permuted(labels, k, m, seed=1):
  """The semantic label map as M > K segments in shuffled order: class c -> segment
  `segment_of[c]` (absent classes give vanished segments), one more vanished segment with a
  class, the rest padding (-1). Returns (segment map, segment_classes, segment_of)."""
  rng = np.random.default_rng(seed)
  segment_of = rng.permutation(m)[:k + 1]
  segments = np.full(labels.shape, 255)
  classes = np.full((labels.shape[0], m), -1, np.int32)
  for c in range(k):
    segments[labels == c] = segment_of[c]
    classes[:, segment_of[c]] = c
  classes[:, segment_of[k]] = 2  # a segment with a class and no pixel: cropped away
  return jnp.asarray(segments), jnp.asarray(classes), segment_of[:k]


def test_segments_are_matched_and_scored_independently_of_order_and_padding():
  outputs, labels, k = _semantic_case()
  m = k + 4
  segments, segment_classes, segment_of = _permuted(labels, k, m)
  sem_targets = mc.LabelMasks(jnp.where(labels < k, labels, -1),
                              jnp.broadcast_to(jnp.arange(k), (2, k)))
  sem_classes = sem_targets.classes
  _, _, sem_valid = mc.semantic_targets(jnp.asarray(labels), k, 255)
  targets, classes, valid = _jit(mc.panoptic_targets)(segments, segment_classes, 255)
  others = np.setdiff1d(np.arange(m), segment_of)
  np.testing.assert_array_equal(np.asarray(valid)[:, segment_of], sem_valid)
  assert not np.asarray(valid)[:, others].any()  # padding and the vanished segment

  matching_cost = jax.jit(mc.output_matching_cost, static_argnums=(4, 5, 6, 7))
  cost_args = (jax.random.key(4), 400, 2.0, 5.0, 5.0)
  sem_cost = matching_cost(outputs, sem_targets, sem_classes, *cost_args)
  cost = matching_cost(outputs, targets, classes, *cost_args)
  np.testing.assert_allclose(np.asarray(cost)[:, :, segment_of], sem_cost, rtol=1e-5,
                             atol=1e-6)
  sem_match = _jit(mc.hungarian_match)(sem_cost, sem_valid)
  match = _jit(mc.hungarian_match)(cost, valid)
  np.testing.assert_array_equal(np.asarray(match)[:, segment_of], sem_match)
  assert (np.asarray(match)[:, others] == -1).all()

  # The losses for that matching at the same points per target.
  rng = np.random.default_rng(5)
  coords = rng.random((2, m, 50, 2)).astype(np.float32)
  losses = _jit(functools.partial(mc.losses_for_assignment, num_points=50, **M2F))
  sem_terms = losses(outputs, sem_targets, sem_classes, sem_match, jnp.sum(sem_valid),
                     point_coords=jnp.asarray(coords[:, segment_of]))
  terms = losses(outputs, targets, classes, match, jnp.sum(valid),
                 point_coords=jnp.asarray(coords))
  for name in terms:
    np.testing.assert_allclose(float(terms[name]), float(sem_terms[name]), rtol=1e-5,
                               err_msg=name)


def test_panoptic_normalisers_weight_micro_batches_exactly():
  """As tests/losses/test_mask2former_loss.py for the semantic loss: each term times its
  micro-batch's share of the batch normaliser (the valid segments) sums to the whole-batch
  term, at a fixed matching and fixed points."""
  rng = np.random.default_rng(7)
  b, q, k, size = 4, 6, 5, 12
  labels = rng.integers(0, k, (b, size, size))
  labels[0] = 255  # an image without segments
  labels[1][labels[1] >= 2] = 0
  segments, segment_classes, _ = _permuted(labels, k, k + 3)
  options = {"num_queries": q, "no_object_weight": 0.1, "mask_normalizer": "valid_targets"}
  normalisers = _jit(lambda seg, cls: LOSSES["mask2former_panoptic"].normalisers(
      seg, k, 255, options, segment_classes=cls))
  counts = normalisers(segments, segment_classes)
  targets, classes, valid = _jit(mc.panoptic_targets)(segments, segment_classes, 255)
  n = int(np.sum(valid))
  assert float(counts["masks"]) == n == 0 + 2 + 5 + 5
  matched = np.minimum(np.sum(valid, 1), q)
  np.testing.assert_allclose(float(counts["queries"]), np.sum(matched + 0.1 * (q - matched)),
                             rtol=1e-6)
  outputs = {"class_logits": jnp.asarray(rng.normal(size=(b, q, k + 1)), jnp.float32),
             "mask_logits": jnp.asarray(rng.normal(size=(b, q, 6, 6)), jnp.float32)}
  match = _jit(lambda o, t, c, v: mc.hungarian_match(
      mc.output_matching_cost(o, t, c, jax.random.key(0), 100, 2.0, 5.0, 5.0), v))(
          outputs, targets, classes, valid)
  coords = jnp.asarray(rng.random((b, k + 3, 20, 2)), jnp.float32)

  def terms(rows):
    sel = lambda x: x[rows]  # noqa: E731
    return _jit(functools.partial(mc.losses_for_assignment, num_points=20, **M2F))(
        jax.tree.map(sel, outputs), mc.LabelMasks(targets.labels[rows], targets.classes[rows]),
        classes[rows], match[rows], jnp.maximum(jnp.sum(valid[rows]), 1.0),
        point_coords=coords[rows])

  whole = terms(np.arange(b))
  accumulated = {name: 0.0 for name in whole}
  for rows in (np.array([0, 2]), np.array([1, 3])):
    share = normalisers(segments[rows], segment_classes[rows])
    for name, value in terms(rows).items():
      key, floor = mc.TERM_NORMALISERS[name]
      accumulated[name] += value * jnp.maximum(share[key], floor) / jnp.maximum(counts[key],
                                                                                floor)
  for name in whole:
    assert abs(float(accumulated[name]) - float(whole[name])) < 1e-5, name


# ----------------------------------------------------------------------------------------------
# Configs.

# name: (size, input size, L2, annealing starts, ends): the release's windows (its
# configs/dinov2/coco/panoptic/eomt_{small,base,large,giant}_640.yaml)
COCO_CONFIGS = {
    "eomt_vit_s_coco_panoptic": ("S", 640, 3, (14782, 36955, 59128), (29564, 51737, 73910)),
    "eomt_vit_b_coco_panoptic": ("B", 640, 3, (14782, 36955, 59128), (29564, 51737, 73910)),
    "eomt_vit_l_coco_panoptic": ("L", 640, 4, (14782, 29564, 44346, 59128),
                                 (29564, 44346, 59128, 73910)),
    "eomt_vit_g_coco_panoptic": ("g", 640, 5, (14782, 25869, 36955, 48042, 59128),
                                 (29564, 40651, 51737, 62824, 73910)),
    "eomt_vit_l_coco_panoptic_1280": ("L", 1280, 4, (14782, 29564, 44346, 59128),
                                      (29564, 44346, 59128, 73910)),
}


@pytest.mark.parametrize("name", sorted(COCO_CONFIGS))
def test_coco_panoptic_config_recipes(name):
  size, px, l2, starts, ends = COCO_CONFIGS[name]
  c = importlib.import_module(f"configs.{name}").get_config()
  assert (c.dataset.name, c.dataset.root, c.dataset.num_classes) == ("coco_panoptic",
                                                                     "data/coco", 133)
  assert c.dataset.max_segments == 100 and c.dataset.ignore_index == 255
  assert round(c.total_steps * c.batch_size / 118_287) == 12 and c.batch_size == 16
  assert c.total_steps == 88_692
  m = c.model
  assert (m.name, m.num_classes, m.num_queries, m.num_blocks) == ("eomt", 133, 200, l2)
  assert m.backbone.variant == f"dinov2-{size}/14-reg4" and m.backbone.patch_size == 16
  assert m.backbone.posemb_grid == (px // 16, px // 16)
  assert (m.mask_annealing.start_steps, m.mask_annealing.end_steps) == (starts, ends)
  assert (c.model_init, c.model_init_format) == (
      f"weights/dinov2_vit{size.lower()}14_reg4_pretrain.pth", "dinov2")
  assert (c.loss.name, c.loss.num_queries) == ("mask2former_panoptic", 200)
  a = c.augment
  assert (a.pipeline, a.crop_size, a.scale_jitter, a.color_jitter, a.flip_prob) == (
      "eomt", (px, px), (0.1, 2.0), False, 0.5)
  assert (c.eval.task, c.eval.resize, c.eval.scale) == ("panoptic", "long_side", (px, px))
  # The rest as the semantic recipe (optimisation, loss weights, pixel statistics; the same for
  # every size).
  semantic = eomt_vit_l_ade20k.get_config()
  assert c.optim.to_dict() == semantic.optim.to_dict()
  assert {k: v for k, v in c.loss.items() if k not in ("name", "num_queries")} == {
      k: v for k, v in semantic.loss.items() if k not in ("name", "num_queries")}
  assert (c.mean, c.std, m.dtype) == (semantic.mean, semantic.std, "bfloat16")
  assert semantic.augment.scale_jitter == (0.5, 2.0) and semantic.augment.color_jitter


def test_coco_panoptic_l_output_shapes():
  from segvit_jax.models import build_model  # pylint: disable=g-import-not-at-top
  c = importlib.import_module("configs.eomt_vit_l_coco_panoptic").get_config()
  model = build_model(c.model)
  x = jax.ShapeDtypeStruct((1, 640, 640, 3), jnp.float32)
  out = jax.eval_shape(model.apply, jax.eval_shape(model.init, jax.random.key(0), x), x)
  assert out["class_logits"].shape == (1, 200, 134)
  assert out["mask_logits"].shape == (1, 200, 160, 160)


# ----------------------------------------------------------------------------------------------
# Training.


# The ViT-L COCO recipe shrunk: a one-block DINOv2-style ViT (width 32) at patch 8 with
# registers and LayerScale, 8 queries, no pretrained weights, 32 px crops of the 32 px
# fabricated images (scale factor 1, no flip: the same 8 images every step), float32, two
# micro-batches per step (the panoptic accumulation normalisers). The same overrides run
# in-process and through train.py, so the CLI reuses the compiled step (persistent cache).
SHRUNK = {
    "model_init": "", "model.backbone.variant": "dinov2-mu/16-reg4",
    "model.backbone.patch_size": 8, "model.backbone.posemb_grid": (4, 4),
    "model.num_blocks": 1, "model.num_queries": 8, "model.dtype": "float32",
    "model.num_classes": NUM_CLASSES, "model.mask_annealing.start_steps": (8,),
    "model.mask_annealing.end_steps": (24,), "dataset.num_classes": NUM_CLASSES,
    "dataset.max_segments": 16, "dataset.num_workers": 0, "loss.num_queries": 8,
    "loss.num_points": 256, "optim.lr": 3e-3, "optim.clip_norm": 1.0,
    "optim.warmup_steps": 2, "optim.backbone_warmup_steps": 2, "augment.crop_size": (32, 32),
    "augment.scale_jitter": (1.0, 1.0), "augment.flip_prob": 0.0, "batch_size": 8,
    "grad_accum_steps": 2, "total_steps": 40, "log_every": 8, "ckpt_every": 40,
    "eval_every": 0,
}
L_CONFIG = "configs/eomt_vit_l_coco_panoptic.py"


def _flag(key, value):
  if isinstance(value, tuple):
    value = "(" + ",".join(map(str, value)) + ("," if len(value) == 1 else "") + ")"
  return f"--config.{key}={value}"


@pytest.fixture(scope="module")
def trained(coco, tmp_path_factory):
  """(workdir, metrics) of the shrunk L recipe trained in-process with `trainer.train`."""
  c = importlib.import_module("configs.eomt_vit_l_coco_panoptic").get_config()
  c.update_from_flattened_dict({**SHRUNK, "dataset.root": coco})
  workdir = str(tmp_path_factory.mktemp("run"))
  trainer.train(c, workdir)
  return workdir, read_metrics(workdir)


def test_small_eomt_trains_on_fabricated_coco_panoptic(trained):
  workdir, metrics = trained
  losses = [m["loss"] for m in metrics]
  assert [m["step"] for m in metrics] == [8, 16, 24, 32, 40]
  assert losses[-1] < 0.7 * losses[0], losses  # measured: 17.43 -> 9.55
  assert all(b < a for a, b in zip(losses, losses[1:])), losses
  for term in ("loss_ce", "loss_mask", "loss_dice"):  # every term learns
    assert metrics[-1][term] < 0.8 * metrics[0][term], term
  assert {"loss_ce_0", "loss_mask_0", "loss_dice_0", "mask_probs_0"} <= set(metrics[0])
  with open(os.path.join(workdir, "classes.txt")) as f:
    assert f.read().split() == [cat["name"] for cat in fabricate.coco_categories()]
  # The COCO category ids and thing flags travel with the workdir (panoptic output needs them).
  categories = checkpoint.load_model(workdir).config.categories
  assert [(c["id"], c["isthing"]) for c in categories] == [
      (c["id"], c["isthing"]) for c in fabricate.coco_categories()]


def test_train_cli_runs_the_coco_config(coco, trained, tmp_path):
  """`python train.py --config configs/eomt_vit_l_coco_panoptic.py --config.dataset.root=ROOT`
  with the same shrinking overrides logs the same losses as the in-process run."""
  workdir = str(tmp_path / "run")
  run("train.py", "--config", L_CONFIG, "--workdir", workdir, f"--config.dataset.root={coco}",
      *(_flag(k, v) for k, v in SHRUNK.items()))
  metrics = read_metrics(workdir)
  assert [m["step"] for m in metrics] == [m["step"] for m in trained[1]]
  np.testing.assert_allclose([m["loss"] for m in metrics], [m["loss"] for m in trained[1]],
                             rtol=1e-6)


def test_eval_cli_reports_pq_with_the_coco_config(coco, trained):
  """`python eval.py --config configs/eomt_vit_l_coco_panoptic.py --workdir W
  --config.dataset.root=ROOT` (the class count and eval size shrunk with the model) prints PQ
  and writes it, with the protocol, to eval_results.json."""
  workdir, _ = trained
  out = run("eval.py", "--config", L_CONFIG, "--workdir", workdir,
            f"--config.dataset.root={coco}", "--num_vis=1",
            *(_flag(k, v) for k, v in {  # the model itself comes from the workdir
                "model.num_classes": NUM_CLASSES, "dataset.num_classes": NUM_CLASSES,
                "eval.scale": (32, 32)}.items())).stdout
  assert re.search(r"PQ: \d+\.\d", out), out[-2000:]
  with open(os.path.join(workdir, "eval_results.json")) as f:
    results = json.load(f)
  assert {"PQ", "SQ", "RQ", "PQ_th", "PQ_st"} <= set(results)
  assert 0.0 <= results["PQ"] <= 100.0
  assert results["protocol"]["task"] == "panoptic"
