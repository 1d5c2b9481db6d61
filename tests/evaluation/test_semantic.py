"""Evaluation end to end and its parts against independent compositions.

eval.py on a fabricated ADE20K copy (multi-scale + flip, the table, eval_results.json with its
protocol, pictures, confusion.png); 2 processes against 1 on loopback (same confusion-derived
numbers, equal to numpy's on the in-process predictor's argmax); `MultiScalePredictor` against
`inference.predict_scores` per view, softmaxed, mirrored back with numpy and summed;
`confusions(without_class0=True)` against numpy; `resize_valid` against torch.

The model is a tiny random SegViT (mu/16 backbone, 1 block, head width 16) with ADE20K's 150
classes. At the paper config's real test size (keep-ratio (2048, 512), crop 512, stride 341) a
48 x 64 image is 26 windows of up to 512^2 per view over the 6 scales, and every window's
(150, 512, 512) scores cost about 0.3 s on a 2-core CPU even for this model: the exact command
`python eval.py --config configs/segvit_vit_b16_ade20k.py --checkpoint B --scales
0.5,0.75,1.0,1.25,1.5,1.75 --flip --config.dataset.root=R` on 2 such images took 48-104 s there
(rc 0, the same outputs; 2026-11-21). So the CLI tests add SMALL: test size (256, 64), crop 64,
stride 32 (28 windows per view, of 64^2).

Measured on that CPU (float32): predictor against the per-view composition <= 3.8e-6 (tiny
SegViT 1.2e-7; asserted 1e-5); flip total / 2 against no flip <= 9.5e-7 (asserted 1e-5);
`resize_valid` against torch <= 2.4e-7 (asserted 1e-5); slide on a one-window image and whole
are bitwise equal; confusion matrices are exact.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import common
from configs import segvit_vit_b16_ade20k
from segvit_jax import bundle as bundle_lib
from segvit_jax import sharding
from segvit_jax.data import ade20k, pipeline
from segvit_jax.data import transforms as T
from segvit_jax.evaluation import evaluate, inference, metrics, pictures, semantic
from segvit_jax.models import Padding, build_model

from tests import fabricate
from tests import support
from tests.support import ROOT, device_env, free_port, run

SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
SMALL = {"eval.scale": (256, 64), "eval.crop_size": (64, 64), "eval.stride": (32, 32)}
SMALL_FLAGS = [f"--config.{k}=({v[0]},{v[1]})" for k, v in SMALL.items()]


def tiny_segvit_config(num_classes: int) -> ml_collections.ConfigDict:
  """The ViT-B ADE20K config's model shrunk: mu/16 backbone (1 block, width 32), head width
  16."""
  m = segvit_vit_b16_ade20k.get_config().model
  m.num_classes = num_classes
  m.backbone.update(variant="mu/16", drop_path=0.0, posemb_grid=(4, 4))
  m.head.update(width=16, num_heads=2, layers_per_stage=1, tap_layers=(0,), dropout=0.0)
  return m


def tiny_segvit(num_classes: int, seed: int = 0):
  """(model config, model, random params). The initial parameters x 8: at initialisation one
  class wins everywhere; scaled, the argmax changes over an image (5 classes in a 64^2 window)."""
  cfg = tiny_segvit_config(num_classes)
  model = build_model(cfg)
  params = nn.meta.unbox(
      jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 64, 64, 3)))["params"])
  return cfg, model, jax.tree.map(lambda x: 8.0 * x, params)


@pytest.fixture(scope="module")
def ade_bundle(tmp_path_factory):
  """A tiny random 150-class SegViT written as a bundle, with the ADE20K config's mean / std."""
  cfg, model, params = tiny_segvit(150)
  paper = segvit_vit_b16_ade20k.get_config()
  path = bundle_lib.save_bundle(str(tmp_path_factory.mktemp("bundle") / "tiny"), params, cfg,
                                mean=paper.mean, std=paper.std,
                                class_names=ade20k.ADE20K_CLASSES)
  return path, model, params


def test_eval_py_ade20k_multiscale_flip_on_fabricated_copy(ade_bundle, tmp_path):
  """eval.py at the SegViT ADE20K protocol, 6 scales + flip (test size SMALL, see above)."""
  root = str(tmp_path / "ADEChallengeData2016")
  fabricate.ade20k(root, num_train=1, num_val=2)
  out = str(tmp_path / "out")
  proc = run("eval.py", "--config", "configs/segvit_vit_b16_ade20k.py", "--checkpoint",
             ade_bundle[0], "--scales", ",".join(map(str, SCALES)), "--flip",
             f"--config.dataset.root={root}", *SMALL_FLAGS, "--output", out, "--num-vis", "1")
  lines = proc.stdout.splitlines()
  assert lines[0].split() == ["|", "Class", "|", "IoU", "|", "Acc", "|"]
  rows = [line for line in lines if line.startswith("| ")][1:]
  assert len(rows) == 150 and rows[0].startswith("| wall ") and rows[-1].startswith("| flag ")
  assert any(line.startswith("aAcc: ") and " mIoU: " in line for line in lines)
  with open(os.path.join(out, "eval_results.json")) as f:
    results = json.load(f)
  assert results["images"] == 2
  assert len(results["per_class"]) == 150 and results["per_class"][0]["name"] == "wall"
  assert 0 <= results["mIoU"] <= 100 and 0 <= results["aAcc"] <= 100
  assert results["protocol"] == {
      "dataset": "ade20k", "split": "val", "resize": "keep_ratio", "scale": [256, 64],
      "min_size": 0, "scales": list(SCALES), "flip": True, "mode": "slide", "crop_size": [64, 64],
      "stride": [32, 32], "average": "softmax", "reduce_zero_label": True}
  written = sorted(os.listdir(os.path.join(out, "pictures")))
  assert written == ["ADE_val_00000001.jpg"]  # --num-vis 1
  with Image.open(os.path.join(out, "pictures", written[0])) as im:
    # The 64 x 48 image enlarged x 6 (short side 288 >= 256), 4 titled panels 4 px apart, a
    # legend of at least one class below.
    assert im.size[0] == 4 * 6 * 48 + 3 * 4
    assert im.size[1] >= pictures.panel_layout(64, 48, pictures.PANEL_TITLES, [0],
                                               ade20k.ADE20K_CLASSES).height == 6 * 64 + 42
  assert os.path.getsize(os.path.join(out, "confusion.png")) > 0


def _ade_eval_config(root: str) -> ml_collections.ConfigDict:
  """What eval.py builds from the paper config, the tiny bundle, SMALL and --scales 0.75,1.0
  --flip."""
  c = segvit_vit_b16_ade20k.get_config()
  c.update_from_flattened_dict({**SMALL, "dataset.root": root, "eval.scales": (0.75, 1.0),
                                "eval.flip": True})
  c.model = tiny_segvit_config(150)
  return c


def test_two_process_evaluation_matches_one_process(ade_bundle, tmp_path):
  """3 images: process 0 evaluates 2, process 1 one. Labels are half the model's own argmax
  (so several classes have non-trivial IoU); both runs must equal numpy on that argmax."""
  path, model, params = ade_bundle
  root = str(tmp_path / "ADEChallengeData2016")
  fabricate.ade20k(root, num_train=1, num_val=3)
  config = _ade_eval_config(root)
  # On one CPU device, as the eval.py processes below: the same programs, the same argmax.
  cpu = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices("cpu")[:1])
  predictor = inference.MultiScalePredictor(
      lambda p, x: model.apply({"params": p}, x)["semantic_scores"], params,
      inference.Protocol.from_config(config), 150, mean=config.mean, std=config.std, mesh=cpu)
  dataset, _ = pipeline.make_eval_dataset(config, "val")
  preds = {}
  for ex in dataset:
    h, w = ex["label"].shape
    preds[ex["name"]] = np.asarray(predictor(ex["images"], (h, w)))[:h, :w].argmax(-1)
  # Left half: the prediction (raw PNG value = class + 1); a 0 (ignored) band on top.
  for name, pred in preds.items():
    png = os.path.join(root, "annotations/validation", name + ".png")
    raw = np.asarray(Image.open(png)).copy()
    w = raw.shape[1]
    raw[:, :w // 2] = pred[:, :w // 2] + 1
    raw[:3] = 0
    Image.fromarray(raw, mode="L").save(png)
  conf = np.zeros((150, 150), np.int64)
  for ex in pipeline.make_eval_dataset(config, "val")[0]:
    label, pred = ex["label"], preds[ex["name"]]
    keep = label != 255
    np.add.at(conf, (label[keep], pred[keep]), 1)
  expected = metrics.segmentation_metrics(conf, ade20k.ADE20K_CLASSES)
  assert conf.sum() == 3 * 64 * 48 - 3 * (48 + 64 + 48)  # a 3-row band per image ignored
  assert 50 <= expected["aAcc"] < 100 and (np.diag(conf) > 0).sum() >= 3

  argv = ["eval.py", "--config", "configs/segvit_vit_b16_ade20k.py", "--checkpoint", path,
          "--scales", "0.75,1.0", "--flip", f"--config.dataset.root={root}", *SMALL_FLAGS,
          "--num_vis", "0"]
  address = f"127.0.0.1:{free_port()}"
  outs = [str(tmp_path / name) for name in ("mp0", "mp1", "one")]
  procs = [subprocess.Popen(
      [sys.executable, *argv, "--output", outs[i], f"--coordinator_address={address}",
       "--num_processes=2", f"--process_id={i}"], cwd=ROOT, env=device_env(1),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  procs.append(subprocess.Popen([sys.executable, *argv, "--output", outs[2]], cwd=ROOT,
                                env=device_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True))
  support.results(procs, timeout=300)
  assert not os.path.exists(os.path.join(outs[1], "eval_results.json"))  # process 0 writes
  runs = []
  for out in (outs[0], outs[2]):
    with open(os.path.join(out, "eval_results.json")) as f:
      runs.append(json.load(f))
  two, one = runs
  assert two["images"] == one["images"] == 3
  assert two["protocol"] == one["protocol"]
  for key in ("mIoU", "mAcc", "aAcc", "per_class"):
    assert two[key] == one[key], key
  assert one["aAcc"] == pytest.approx(expected["aAcc"], abs=1e-9)
  assert one["mIoU"] == pytest.approx(expected["mIoU"], abs=1e-9)
  ious = [np.nan if r["IoU"] is None else r["IoU"] for r in one["per_class"]]
  np.testing.assert_allclose(ious, [r["IoU"] for r in expected["per_class"]], atol=1e-9)


# ----------------------------------------------------------------------------------------------
# MultiScalePredictor against predict_scores per view.

C = 5
_RNG = np.random.default_rng(0)
_W = jnp.asarray(_RNG.normal(size=(3, C)), jnp.float32)
_W2 = jnp.asarray(_RNG.normal(size=(3, C)), jnp.float32)
_B = jnp.asarray([0.1, -0.2, 0.3, 0.0, 0.5], jnp.float32)
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


def pointwise_scores(x: jax.Array) -> jax.Array:
  """Per-pixel linear map (B, H, W, 3) -> (B, C, H, W): flip-equivariant, tiling-invariant."""
  return jnp.einsum("bhwc,ck->bkhw", x, _W, precision="highest") + _B[None, :, None, None]


def window_mixing_scores(x: jax.Array) -> jax.Array:
  """(B, C, H/4, W/4): 4x4 means of the pointwise scores plus a term of the window's mean
  colour, so every window's origin, size and zero padding show in the result."""
  b, h, w, _ = x.shape
  s = pointwise_scores(x)
  if h % 4 == 0 and w % 4 == 0:  # (any size: a model without padding sees every window size)
    s = s.reshape(b, C, h // 4, 4, w // 4, 4).mean(axis=(3, 5))
  return s + 3.0 * jnp.tanh(x.mean(axis=(1, 2)) @ _W2)[:, :, None, None]


def _predictor(score_fn, protocol: inference.Protocol, params=None, apply_fn=None):
  apply_fn = apply_fn or (lambda p, x: score_fn(x))
  return inference.MultiScalePredictor(apply_fn, params if params is not None else {}, protocol,
                                       C, mean=MEAN, std=STD)


def protocol(**kw) -> inference.Protocol:
  """An inference.Protocol: the skeleton's evaluation knobs (configs/common.py, a ViT-16's
  size divisor) with `kw` overriding them."""
  ev = common.run_config().eval
  multiple = kw.pop("size_divisor", 16)
  fill, back = kw.pop("rule", ("zero", "crop"))
  return inference.Protocol(**{
      "mode": ev.mode, "crop": tuple(ev.crop_size), "stride": tuple(ev.stride), "flip": ev.flip,
      "average": ev.average, "window_batch": ev.window_batch, "bucket": ev.bucket,
      "padding": Padding(multiple, fill, back), **kw})


def reference_total(score_fn, images, out_size, p: inference.Protocol) -> np.ndarray:
  """Sum over images and flips of softmax(predict_scores(view, out_size)) (raw scores for
  average="scores" or a single view), the mirror's scores mirrored back, all with numpy flips."""
  views = 2 if p.flip else 1
  softmax = p.average == "softmax" and len(images) * views > 1
  predict = jax.jit(functools.partial(
      inference.predict_scores, score_fn, mode=p.mode, crop=p.crop, stride=p.stride,
      num_classes=C, out_size=tuple(out_size), size_divisor=p.padding.multiple,
      back=p.padding.back, fill=inference.pad_value(p.padding, MEAN, STD)))
  total = np.zeros((C, *out_size), np.float32)
  for image in images:
    x = (image.astype(np.float32) - np.float32(MEAN)) / np.float32(STD)
    for flipped in range(views):
      view = np.ascontiguousarray(x[:, ::-1] if flipped else x)
      s = predict(jnp.asarray(view[None]))
      s = np.asarray(jax.nn.softmax(s, axis=1) if softmax else s)[0]
      total += s[:, :, ::-1] if flipped else s
  return total


def chw(total: jax.Array) -> np.ndarray:
  """A predictor's (Hb, Wb, C) total as (C, Hb, Wb)."""
  return np.moveaxis(np.asarray(total), -1, 0)


def _images(sizes, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


# Out size 40 x 70 (buffer 64 x 128 at bucket 64); views 20 x 28 (smaller than the crop on both
# sides), 40 x 70 (non-square, padded to 64 x 128), 56 x 98 (15 windows of 32 at stride 20).
SIZES = [(20, 28), (40, 70), (56, 98)]
OUT = (40, 70)


# Every padding rule (segvit_jax.models.PADDING_RULES): mmseg's (zero, resize), EoMT's (black,
# crop) and none (a multiple of 1: SegFormer); views smaller than the crop and not multiples of
# 16 are padded.
RULES = [(16, ("zero", "resize")), (16, ("black", "crop")), (1, ("zero", "resize")),
         (16, ("zero", "crop"))]


@pytest.mark.parametrize("mode,average,rule", [
    ("slide", "softmax", RULES[0]), ("spread", "softmax", RULES[1]),
    ("whole", "softmax", RULES[0]), ("whole", "softmax", RULES[1]),
    ("whole", "scores", RULES[2]), ("slide", "scores", RULES[3]), ("slide", "softmax", RULES[2])])
def test_predictor_equals_sum_of_predict_scores_views(mode, average, rule):
  multiple, rule = rule
  p = protocol(mode=mode, crop=(32, 32), stride=(20, 20), flip=True, average=average,
               window_batch=4, bucket=64, size_divisor=multiple, rule=rule)
  images = _images(SIZES)
  total = _predictor(window_mixing_scores, p)(images, OUT)
  assert total.shape == (64, 128, C)  # channels last
  expected = reference_total(window_mixing_scores, images, OUT, p)
  # Summed raw scores reach ~10 (average "scores"): float32 rounding of two op orders, up to
  # 6e-5 measured; probabilities 1e-5.
  atol = 1e-4 if average == "scores" else 1e-5
  np.testing.assert_allclose(chw(total)[:, :40, :70], expected, atol=atol, rtol=0)
  if average == "softmax":  # 6 views of probabilities
    np.testing.assert_allclose(expected.sum(axis=0), 6.0, atol=1e-5)


def test_predictor_equals_sum_of_predict_scores_views_tiny_segvit():
  _, model, params = tiny_segvit(C, seed=1)
  apply_fn = lambda prm, x: model.apply({"params": prm}, x)["semantic_scores"]  # noqa: E731
  p = protocol(mode="slide", crop=(32, 32), stride=(20, 20), flip=True, window_batch=4,
               bucket=64, size_divisor=16)
  images = _images(SIZES[:2], seed=1)
  total = _predictor(None, p, params, apply_fn)(images, OUT)
  expected = reference_total(functools.partial(apply_fn, params), images, OUT, p)
  assert np.ptp(expected[0]) > 100 * 1e-5  # the random model's scores vary over the image
  np.testing.assert_allclose(chw(total)[:, :40, :70], expected, atol=1e-5, rtol=0)


def test_slide_on_one_window_image_equals_whole():
  images = _images([(32, 32)], seed=2)
  kw = dict(crop=(32, 32), stride=(20, 20), flip=True, size_divisor=16)
  slide = _predictor(window_mixing_scores, protocol(mode="slide", **kw))(images, (45, 50))
  whole = _predictor(window_mixing_scores, protocol(mode="whole", **kw))(images, (45, 50))
  np.testing.assert_array_equal(np.asarray(slide), np.asarray(whole))


def test_flip_of_flip_equivariant_scores_doubles_the_total():
  # Views at ratios 1 and 1/2: their bilinear taps are exact in float32, so mirrored pixels
  # get bitwise mirrored weights. (At ratio 1.4, 56 x 98 -> 40 x 70, the taps' rounding
  # differs between a pixel and its mirror: up to 2.6e-5 on these random images.)
  images = _images([(40, 70), (20, 35)], seed=3)
  kw = dict(mode="slide", crop=(32, 32), stride=(20, 20), average="scores", window_batch=4)
  plain = chw(_predictor(pointwise_scores, protocol(**kw))(images, OUT))
  both = chw(_predictor(pointwise_scores, protocol(flip=True, **kw))(images, OUT))
  np.testing.assert_allclose(both[:, :40, :70] / 2, plain[:, :40, :70], atol=1e-5, rtol=0)
  np.testing.assert_array_equal(both[:, :40, :70].argmax(0), plain[:, :40, :70].argmax(0))


def test_scales_one_equals_single_scale():
  """ratios (1.0,) give the single-scale image, and one view is raw scores (no softmax)."""
  image = _images([(48, 64)], seed=4)[0]
  record = {"image": image, "label": np.zeros((48, 64), np.uint8), "name": "x"}
  out = T.MultiScaleResize(resize="keep_ratio", scale=(256, 64), ratios=(1.0,), size_divisor=32,
                           min_size=0).map(record)
  single = T.resize_for_test(image, "keep_ratio", (256, 64), 1.0, 32, 0)
  assert len(out["images"]) == 1 and single.shape == (64, 85, 3)
  np.testing.assert_array_equal(out["images"][0], single)
  p = protocol(mode="slide", crop=(64, 64), stride=(32, 32))
  total = _predictor(window_mixing_scores, p)(out["images"], (48, 64))
  x = (single.astype(np.float32) - np.float32(MEAN)) / np.float32(STD)
  expected = inference.predict_scores(window_mixing_scores, jnp.asarray(x[None]), mode="slide",
                                      crop=(64, 64), stride=(32, 32), out_size=(48, 64),
                                      size_divisor=16)
  np.testing.assert_allclose(chw(total)[:, :48, :64], np.asarray(expected)[0], atol=1e-5,
                             rtol=0)


# ----------------------------------------------------------------------------------------------
# Confusion matrices and the traced-size resize.


def test_confusions_without_class0_against_numpy():
  k, ignore = 6, 255
  rng = np.random.default_rng(5)
  total = rng.normal(size=(k, 16, 24)).astype(np.float32)
  label = rng.integers(0, k, (16, 24)).astype(np.int32)
  label[rng.random((16, 24)) < 0.2] = ignore
  pred, mats = semantic.confusions(jnp.asarray(np.moveaxis(total, 0, -1)), jnp.asarray(label),
                                   num_classes=k,
                                   ignore_index=ignore, without_class0=True)
  pred0 = total[1:].argmax(0) + 1
  expected = np.zeros((2, k, k), np.int64)
  for m, (p, keep) in enumerate([(total.argmax(0), label != ignore),
                                 (pred0, (label != ignore) & (label != 0))]):
    np.add.at(expected[m], (label[keep], p[keep]), 1)
  np.testing.assert_array_equal(np.asarray(pred), total.argmax(0))
  np.testing.assert_array_equal(np.asarray(mats), expected)
  assert mats.shape == (2, k, k)
  assert expected[1][0].sum() == 0 and expected[1][:, 0].sum() == 0
  assert (pred0 != total.argmax(0)).any()  # class 0 wins somewhere: the two matrices differ
  assert expected[1].sum() == ((label != ignore) & (label != 0)).sum()


@pytest.mark.parametrize("in_size,out_size", [
    ((7, 9), (20, 13)),  # up-sampling
    ((40, 70), (13, 22)),  # down-sampling
    ((11, 50), (30, 17)),  # up in height, down in width
])
def test_resize_valid_matches_torch_bilinear(in_size, out_size):
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(6)
  x = rng.normal(size=(2, 3, 64, 128)).astype(np.float32)
  x[..., in_size[0]:, :] = 1e4  # padding must not leak into the valid region
  x[..., in_size[1]:] = -1e4
  resize = jax.jit(inference.resize_valid, static_argnames=("out_shape",))
  out = resize(jnp.asarray(x), tuple(map(jnp.int32, in_size)), tuple(map(jnp.int32, out_size)),
               out_shape=(64, 64))
  ref = torch.nn.functional.interpolate(
      torch.from_numpy(x[..., :in_size[0], :in_size[1]].copy()), size=out_size,
      mode="bilinear", align_corners=False).numpy()
  assert out.shape == (2, 3, 64, 64)
  np.testing.assert_allclose(np.asarray(out)[..., :out_size[0], :out_size[1]], ref, atol=1e-5,
                             rtol=0)


def test_pascal_context_reports_miou60_and_miou59(tmp_path):
  """A 60-class model on PASCAL-Context: mIoU60 over all pixels and mIoU59 as a 59-class model
  would score (background never predicted, background pixels ignored), equal to numpy on the
  predictor's own summed scores."""
  voc = str(tmp_path / "VOCdevkit" / "VOC2010")
  label = np.zeros((40, 56), np.uint8)
  label[:, 20:] = 7
  label[25:, :] = 33  # background (0), two classes
  fabricate.pascal_context(voc, label)
  cfg, model, params = tiny_segvit(60)
  c = common.run_config()
  c.dataset.update(name="pascal_context", root=str(tmp_path), num_classes=60)
  c.update_from_flattened_dict({**SMALL, "eval.mode": "slide"})
  c.model = cfg
  results = evaluate(model, {"params": params}, c)
  assert results["mIoU60"] == results["mIoU"]
  assert results["mIoU59"] == results["without_class0"]["mIoU"]
  assert [r["name"] for r in results["without_class0"]["per_class"]][:2] == [
      "aeroplane", "bag"]
  assert len(results["without_class0"]["per_class"]) == 59
  # The same numbers from numpy on the summed scores of the one val image.
  ex = pipeline.make_eval_dataset(c)[0][0]
  total = chw(semantic.make_predictor(model, {"params": params}, c)(ex["images"],
                                                                     label.shape))[:, :40, :56]
  pred59 = total[1:].argmax(0) + 1
  keep = label != 0
  conf = np.zeros((60, 60), np.int64)
  np.add.at(conf, (label[keep].astype(int), pred59[keep]), 1)
  assert results["mIoU59"] == pytest.approx(
      metrics.segmentation_metrics(conf[1:, 1:])["mIoU"], abs=1e-9)
  conf60 = np.zeros((60, 60), np.int64)
  np.add.at(conf60, (label.astype(int).ravel(), total.argmax(0).ravel()), 1)
  assert results["mIoU60"] == pytest.approx(metrics.segmentation_metrics(conf60)["mIoU"],
                                            abs=1e-9)
