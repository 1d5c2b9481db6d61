"""EoMT on COCO instances: the panoptic loss on layered segment maps (overlapping instances)
equals the loss on the dense mask stack; COCO mask AP on overlapping, crowd-flagged ground truth
by hand and against pycocotools' COCOeval on the json itself; the instance configs' recipe; a
tiny training run (with its instance evaluation) on a fabricated COCO instances tree."""

import contextlib
import importlib
import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segvit_jax import trainer
from segvit_jax.data import pipeline
from segvit_jax.data import transforms as T
from segvit_jax.evaluation import evaluate, panoptic, pq
from segvit_jax.losses import LOSSES
from segvit_jax.losses import mask_classification as mc
from tests import fabricate
from tests.support import read_metrics

M2F = dict(oversample_ratio=3.0, importance_ratio=0.75, no_object_weight=0.1, class_weight=2.0,
           mask_weight=5.0, dice_weight=5.0, mask_normalizer="matched_targets")
INSTANCE_CONFIGS = ("eomt_vit_l_coco_instance", "eomt_vit_l_coco_instance_1280",
                    "eomt_dinov3_vit_l_coco_instance", "eomt_dinov3_vit_l_coco_instance_1280")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  return fabricate.write_coco_instances(str(tmp_path_factory.mktemp("data") / "coco"))


# ----------------------------------------------------------------------------------------------
# The loss on layers.


def _outputs(rng, b, q, k, h, w):
  k1, k2, k3, k4 = jax.random.split(rng, 4)
  return {"class_logits": jax.random.normal(k1, (b, q, k + 1)),
          "mask_logits": 3 * jax.random.normal(k2, (b, q, h, w)),
          "aux_outputs": [{"class_logits": jax.random.normal(k3, (b, q, k + 1)),
                           "mask_logits": 3 * jax.random.normal(k4, (b, q, h, w))}]}


def test_layered_targets_give_the_dense_mask_loss():
  """`mask2former_panoptic_loss` on (B, H, W, L) layered segment maps of overlapping masks
  equals `mask2former_loss` on the (B, M, H, W) masks themselves (same points, same matching):
  every term, auxiliary ones too, to float32 rounding; the accumulation normalisers count the
  same targets."""
  b, q, k, m, size = 2, 7, 4, 6, 24
  rng = np.random.default_rng(3)
  masks = np.zeros((b, m, size, size), bool)
  for i in range(b):
    for j in range(m - i):  # image 1 has one padding slot
      y, x = rng.integers(0, size - 8, 2)
      masks[i, j, y:y + int(rng.integers(5, 12)), x:x + int(rng.integers(5, 12))] = True
  classes = rng.integers(0, k, (b, m)).astype(np.int32)
  labels, segment_classes = zip(*(T.segment_map(masks[i, :m - i], classes[i, :m - i], m, 255,
                                                mask_layers=m) for i in range(b)))
  labels, segment_classes = np.stack(labels), np.stack(segment_classes)
  for i in range(b):  # the layers hold every mask exactly (M layers always suffice)
    for j in range(m - i):
      np.testing.assert_array_equal((labels[i] == j).any(-1), masks[i, j])
  assert (masks.sum(1) > 1).any()  # and the masks do overlap
  out = _outputs(jax.random.key(0), b, q, k, size // 2, size // 2)
  options = dict(num_points=64, **M2F)
  key = jax.random.key(1)
  total, terms = mc.mask2former_panoptic_loss(
      out, jnp.asarray(labels), segment_classes=jnp.asarray(segment_classes), num_classes=k,
      ignore_index=255, rng=key, **options)
  valid = segment_classes >= 0
  total_ref, terms_ref = mc.mask2former_loss(
      out, jnp.asarray(masks), jnp.asarray(np.maximum(segment_classes, 0)), jnp.asarray(valid),
      rng=key, **options)
  assert set(terms) == set(terms_ref) and "loss_dice_0" in terms
  diff = max(abs(float(terms[n]) - float(terms_ref[n])) for n in terms)
  print(f"max abs difference of the loss terms, layers vs dense masks: {diff:.3g}")
  assert diff < 1e-5, diff  # measured: 0 (the same samples)
  assert abs(float(total) - float(total_ref)) < 1e-5
  norms = mc.mask2former_panoptic_normalisers(jnp.asarray(labels), k, 255,
                                              {**options, "num_queries": q},
                                              segment_classes=jnp.asarray(segment_classes))
  assert float(norms["masks"]) == valid.sum() == 11


# ----------------------------------------------------------------------------------------------
# Mask AP on overlapping ground truth.


def _square(h, w, y0, y1, x0, x1):
  m = np.zeros((h, w), bool)
  m[y0:y1, x0:x1] = True
  return m


def test_mask_ap_on_overlapping_ground_truth_by_hand():
  """Two same-class objects that overlap by 100 px and a crowd region, all < 32^2 px (small).
  Detections equal to the two objects score AP 100 from the mask stack; a segment map would
  have given the overlap to one of them (the other's IoU 0.75: misses at IoU >= 0.8). A
  detection on the crowd region is ignored (still 100); off every object, ranked first, it is
  a false positive: precision 1/2 at recall 1/2, 2/3 at recall 1, so COCO's interpolated
  precision is 2/3 at every recall point: AP 66.67."""
  h = w = 40
  g1, g2 = _square(h, w, 0, 20, 0, 20), _square(h, w, 10, 30, 10, 30)
  crowd = _square(h, w, 30, 40, 0, 40)
  gt = np.stack([g1, g2, crowd])

  def ap(extra, gt_masks=gt):
    acc = pq.InstanceAccumulator()
    masks = np.stack([g1, g2, extra])
    acc.add_image(0, gt_masks, [0, 0, 0], [False, False, True], masks, [0, 0, 0],
                  [0.9, 0.8, 0.95])
    return pq.mask_ap(acc, ["thing"])

  r = ap(_square(h, w, 32, 38, 5, 21))  # on the crowd region
  assert [r["AP"], r["AP50"], r["AP75"], r["APs"]] == pytest.approx([100.0] * 4)
  assert r["per_class"] == [{"name": "thing", "AP": pytest.approx(100.0)}]
  r = ap(_square(h, w, 0, 6, 30, 40))  # on nothing
  assert [r["AP"], r["AP50"]] == pytest.approx([200 / 3, 200 / 3])
  # The same objects as a segment map (g2 painted over g1): the first detection's IoU with
  # what is left of g1 is 300 / 400, so it misses at the 5 thresholds from 0.8 on.
  segments = np.zeros((h, w), np.int32)
  for i, mask in enumerate(gt):
    segments[mask] = i + 1
  r = ap(_square(h, w, 32, 38, 5, 21), segments)
  assert r["AP75"] == pytest.approx(100.0) and r["AP"] < 100.0


def test_mask_ap_equals_cocoeval_on_the_json(tree):
  """The accumulator fed from the evaluation records (mask stacks, crowd flags, json areas) of
  the fabricated val split and detections made from the ground truth (shifted, some dropped,
  a wrong class, random scores) gives the numbers pycocotools' COCOeval gives on the json file
  itself with the same detections (in COCO ids): equal to 1e-12."""
  from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
  from pycocotools.cocoeval import COCOeval  # pylint: disable=g-import-not-at-top
  root, _ = tree
  c = _config(root)
  dataset, categories = pipeline.make_panoptic_eval_dataset(c, "val")
  rng = np.random.default_rng(0)
  acc, detections = pq.InstanceAccumulator(), []
  with open(os.path.join(root, "annotations", "instances_val2017.json")) as f:
    image_ids = {img["file_name"][:-4]: img["id"] for img in json.load(f)["images"]}
  for ex in dataset:
    gt = ex["segments"]
    assert gt.ndim == 3 and gt.dtype == bool and "segment_areas" in ex
    masks = np.roll(gt, int(rng.integers(0, 3)), axis=2)[:-1]  # the last object missed
    labels = ex["segment_classes"][:-1].copy()
    labels[0] = (labels[0] + 1) % 3
    scores = rng.random(len(masks))
    acc.add_image(ex["image_id"], gt, ex["segment_classes"], ex["segment_is_crowd"], masks,
                  labels, scores, gt_areas=ex["segment_areas"])
    for rle, label, score in zip(pq.encode_masks(masks), labels, scores):
      detections.append({"image_id": image_ids[ex["name"]], "segmentation": rle,
                         "category_id": categories.coco_ids[int(label)],
                         "score": float(score)})
  ours = pq.mask_ap(acc, categories.names)
  with contextlib.redirect_stdout(io.StringIO()):
    coco = COCO(os.path.join(root, "annotations", "instances_val2017.json"))
    ev = COCOeval(coco, coco.loadRes(detections), iouType="segm")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  want = [float("nan") if v < 0 else v * 100 for v in ev.stats[:6]]
  got = [ours[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
  np.testing.assert_allclose(got, want, atol=1e-12, equal_nan=True)
  assert 0 < ours["AP"] < 100


# ----------------------------------------------------------------------------------------------
# Configs.


@pytest.mark.parametrize("name", INSTANCE_CONFIGS)
def test_instance_configs_are_the_panoptic_recipes_on_instances(name):
  """Each instance config is its panoptic counterpart (the same release recipe: lr, warm-up,
  layer decay, schedule, queries, loss) on COCO instances: 80 classes, 4 mask layers, instance
  evaluation ranked by AP; on DINOv3 the annealing windows are the DINOv2 ones (the release's
  configs/dinov3/coco/instance/*.yaml)."""
  c = importlib.import_module(f"configs.{name}").get_config()
  panoptic = importlib.import_module(
      f"configs.{name.replace('instance', 'panoptic')}").get_config()
  assert (c.dataset.name, c.dataset.num_classes, c.dataset.max_segments,
          c.dataset.mask_layers) == ("coco_instance", 80, 100, 4)
  assert c.model.num_classes == 80 and c.loss.name == "mask2former_panoptic"
  assert (c.eval.task, c.eval.top_k, c.eval.best_metric) == ("instance", 100, "AP")
  ma = c.model.mask_annealing
  assert (ma.start_steps, ma.end_steps) == ((14782, 29564, 44346, 59128),
                                            (29564, 44346, 59128, 73910))
  differ = {"dataset.name", "dataset.num_classes", "dataset.mask_layers",
            "model.num_classes", "eval.task", "eval.best_metric",
            "model.mask_annealing.start_steps", "model.mask_annealing.end_steps"}
  flat, flat_panoptic = _flatten(c.to_dict()), _flatten(panoptic.to_dict())
  assert {k for k in flat if flat[k] != flat_panoptic.get(k)} <= differ
  assert ("dinov3" in name) == (panoptic.model.mask_annealing.start_steps[0] == 0)
  smoke = importlib.import_module(f"configs.{name}").get_config("smoke")
  assert (smoke.dataset.name, smoke.dataset.mask_layers, smoke.eval.task) == (
      "coco_instance", 4, "instance")


def test_panoptic_evaluation_of_instances_is_refused(tree):
  c = _config(tree[0], **{"eval.task": "panoptic"})
  with pytest.raises(ValueError, match="config.eval.task='panoptic' needs panoptic ground truth "
                                       r".*dataset 'coco_instance' has instances: set "
                                       "config.eval.task='instance'"):
    panoptic.evaluate(None, None, c, split="val")


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


# ----------------------------------------------------------------------------------------------
# Training.


def _config(root, **overrides):
  """The DINOv2 EoMT-L instance recipe on the fabricated tree, shrunk as tests/
  test_panoptic_train.py's SHRUNK: a one-block ViT at patch 8, 8 queries, 48 px crops of the
  48 x 56 images (scale factor 1, no flip), 2 mask layers, float32."""
  c = importlib.import_module("configs.eomt_vit_l_coco_instance").get_config()
  c.update_from_flattened_dict({
      "dataset.root": root, "model_init": "", "model.backbone.variant": "dinov2-mu/16-reg4",
      "model.backbone.patch_size": 8, "model.backbone.posemb_grid": (6, 6),
      "model.num_blocks": 1, "model.num_queries": 8, "model.dtype": "float32",
      "model.num_classes": 3, "model.mask_annealing.start_steps": (6,),
      "model.mask_annealing.end_steps": (18,), "dataset.num_classes": 3,
      "dataset.max_segments": 8, "dataset.mask_layers": 2, "dataset.num_workers": 0,
      "loss.num_queries": 8, "loss.num_points": 256, "optim.lr": 3e-3, "optim.clip_norm": 1.0,
      "optim.warmup_steps": 2, "optim.backbone_warmup_steps": 2, "augment.crop_size": (48, 48),
      "augment.scale_jitter": (1.0, 1.0), "augment.flip_prob": 0.0, "batch_size": 6,
      "grad_accum_steps": 2, "total_steps": 24, "log_every": 6, "ckpt_every": 24,
      "eval_every": 24, "eval.scale": (48, 48), "eval.crop_size": (48, 48),
      "eval.stride": (48, 48), **overrides})
  return c


def test_training_batches_carry_the_layers(tree):
  root, expected = tree
  c = _config(root)
  assert pipeline.train_batch_spec(c)["label"] == ((48, 48, 2), np.int32)
  batch = next(pipeline.make_train_iterator(c, 0, 1))
  assert batch["label"].shape == (6, 48, 48, 2) and batch["segment_classes"].shape == (6, 8)
  # Crowd dropped: 3 instances per image (red, green, blue), and the green one overlaps the red
  # one, so it sits in layer 1 wherever it is.
  assert ((batch["segment_classes"] >= 0).sum(1) == 3).all()
  assert (batch["label"][..., 1] != 255).any()
  assert sorted(np.unique(batch["label"][..., 1]).tolist()) == [1, 255]


def test_small_eomt_trains_and_evaluates_on_fabricated_coco_instances(tree, tmp_path):
  """24 steps: the loss falls, every term learns; the run's evaluation (eval_every) reports
  COCO mask AP of the val split under the instance protocol."""
  root, _ = tree
  c = _config(root)
  workdir = str(tmp_path / "run")
  trainer.train(c, workdir, evaluate_fn=evaluate)
  metrics = [m for m in read_metrics(workdir) if "loss" in m]
  losses = [m["loss"] for m in metrics]
  assert [m["step"] for m in metrics] == [6, 12, 18, 24]
  assert np.isfinite(losses).all() and losses[-1] < 0.8 * losses[0], losses
  for term in ("loss_ce", "loss_mask", "loss_dice"):
    assert metrics[-1][term] < metrics[0][term], term
  with open(os.path.join(workdir, "eval", "step_24", "eval_results.json")) as f:
    results = json.load(f)
  assert results["protocol"]["task"] == "instance"
  assert {"AP", "AP50", "AP75"} <= set(results) and 0.0 <= results["AP"] <= 100.0
  assert [r["name"] for r in results["per_class"]] == ["red", "green", "blue"]
  assert LOSSES[c.loss.name].batch_keys == ("segment_classes",)
