"""One inference path for eval.py, predict.py and `Bundle.predict`, and what a user's inputs do
to it:

- eval.py and predict.py give the same per-pixel labels for one bundle and protocol (6 views:
  two scales x flip): eval.py scores predict.py's own label maps as ground truth at aAcc 100;
  eval.py normalises with the bundle's statistics, not a config's differing ones (a warning
  names both; with the config's statistics the labels differ), and eval_results.json records
  what was evaluated.
- Every protocol value is checked before anything compiles: --scales 0,-1 / nan / 1e-9 and bad
  config.eval values are one error line naming the flag or key.
- A folder of 20 images of 8 sizes under a recorded sliding-window protocol compiles a bounded
  number of programs (38 counted, 9 of them the model; the same sizes again none, new nearby
  sizes no model program; the raw whole-image protocol compiles the model per size). The
  SegViT ADE20K protocol at its real sizes compiles 4 model programs for images up to 4:1.
- A 4000 x 3000 photo runs through the protocol's windows within this machine's memory; as one
  whole-image forward pass it is refused with a message before anything compiles.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import segvit_vit_b16_ade20k
from segvit_jax import bundle as bundle_lib
from segvit_jax.data import ade20k
from segvit_jax.evaluation import inference

from tests import fabricate
from tests.evaluation.test_semantic import SMALL, SMALL_FLAGS, tiny_segvit
from tests.support import run

SCALES = (0.75, 1.0)
IMAGENET = dict(mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))


def ade_protocol(**overrides) -> dict:
  """The SegViT ADE20K test protocol at SMALL sizes (64 px windows), as a bundle records it."""
  c = segvit_vit_b16_ade20k.get_config()
  c.update_from_flattened_dict({**SMALL, "eval.scales": SCALES, "eval.flip": True,
                                **overrides})
  return c.eval.to_dict()


def tiny_bundle(path: str, num_classes: int = 150, class_names=ade20k.ADE20K_CLASSES,
                **protocol) -> str:
  cfg, _, params = tiny_segvit(num_classes)
  return bundle_lib.save_bundle(path, params, cfg, **IMAGENET, class_names=class_names,
                                eval=ade_protocol(**protocol))


def test_eval_and_predict_agree_with_the_bundles_statistics(tmp_path):
  path = tiny_bundle(str(tmp_path / "bundle"))
  root = str(tmp_path / "ADEChallengeData2016")
  fabricate.ade20k(root, num_train=1, num_val=2)
  val = os.path.join(root, "images", "validation")
  views = ["--scales", ",".join(map(str, SCALES)), "--flip"]
  run("predict.py", "--checkpoint", path, "--input", val, "--output", str(tmp_path / "pred"),
      *views)
  # predict.py's labels become the ground truth (ADE20K stores class + 1; 0 is "other").
  names = sorted(os.listdir(val))
  for name in names:
    stem = os.path.splitext(name)[0]
    pred = np.asarray(Image.open(tmp_path / "pred" / f"{stem}.png"))
    assert len(np.unique(pred)) > 1  # a random model whose labels vary over the image
    Image.fromarray((pred + 1).astype(np.uint8)).save(
        os.path.join(root, "annotations", "validation", f"{stem}.png"))
  out = str(tmp_path / "eval")
  proc = run("eval.py", "--config", "configs/segvit_vit_b16_ade20k.py", "--checkpoint", path,
             f"--config.dataset.root={root}", *SMALL_FLAGS, *views, "--output", out,
             "--num_vis", "0", "--config.mean=(127.5,127.5,127.5)",
             "--config.std=(127.5,127.5,127.5)")
  assert "config.mean=(127.5, 127.5, 127.5) differs from" in proc.stderr
  assert "mean=(123.675, 116.28, 103.53): using the model's" in proc.stderr
  with open(os.path.join(out, "eval_results.json")) as f:
    results = json.load(f)
  assert results["aAcc"] == 100.0 and results["images"] == 2
  evaluated = results["evaluated"]
  assert evaluated["checkpoint"] == path and evaluated["kind"] == "bundle"
  assert evaluated["config_file"] == "configs/segvit_vit_b16_ade20k.py"
  assert evaluated["config"]["mean"] == list(IMAGENET["mean"])
  assert evaluated["config"]["eval"]["scales"] == list(SCALES)
  # The config's statistics would have given other labels: the warning is not cosmetic.
  b = bundle_lib.load_bundle(path)
  image = np.asarray(Image.open(os.path.join(val, names[0])))
  ours = b.predict(image[None])[0].argmax(0)
  with b.config.unlocked():
    b.config.mean = b.config.std = (127.5,) * 3
  b._predictors.clear()  # pylint: disable=protected-access
  assert (b.predict(image[None])[0].argmax(0) != ours).mean() > 0.05


@pytest.mark.parametrize("value", ["0,-1", "nan", "1e-9", "1,x"])
def test_bad_scales_are_one_error_line(value, tmp_path):
  path = tiny_bundle(str(tmp_path / "bundle"), num_classes=4, class_names=list("abcd"))
  proc = run("eval.py", "--config", "configs/segvit_vit_b16_ade20k.py", "--checkpoint", path,
             "--scales", value, check=False)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: ValueError: --scales={value}: expected one or more ratios from 0.1 to 10.0, "
      "e.g. 0.5,0.75,1.0,1.25,1.5,1.75")
  assert "Traceback" not in proc.stderr
  images = tmp_path / "images"
  images.mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / "a.png")
  proc = run("predict.py", "--checkpoint", path, "--input", str(images), "--output",
             str(tmp_path / "out"), "--scales", value, check=False)
  assert proc.returncode == 1 and f"--scales={value}: expected" in proc.stderr


@pytest.mark.parametrize("key,value,message", [
    ("mode", "sliding", "config.eval.mode='sliding': expected one of ('slide', 'spread', "
     "'whole')"),
    ("crop_size", (0, 64), "config.eval.crop_size=(0, 64): expected two positive integers"),
    ("stride", (96, 96), "config.eval.stride=(96, 96) is larger than config.eval.crop_size="
     "(64, 64)"),
    ("scales", (1.0, float("nan")), "config.eval.scales=1.0,nan: expected one or more ratios"),
    ("average", "mean", "config.eval.average='mean': expected one of ('softmax', 'scores')"),
    ("window_batch", 0, "config.eval.window_batch=0: expected a positive integer"),
])
def test_every_protocol_value_is_checked(key, value, message):
  ev = ml_collections.ConfigDict(ade_protocol(**{f"eval.{key}": value}))
  with pytest.raises(ValueError) as e:
    inference.check_protocol(ev)
  assert message in str(e.value)


class Compilations(logging.Handler):
  """Counts XLA compilations by program name (jax's compile log) while active."""

  def __init__(self):
    super().__init__()
    self.names = collections.Counter()

  def emit(self, record):
    m = re.search(r"Finished XLA compilation of (\S+)", record.getMessage())
    if m:
      self.names[m.group(1)] += 1

  def __enter__(self):
    self.names.clear()
    self._log = jax.log_compiles(True)
    self._log.__enter__()
    logging.getLogger("jax").addHandler(self)
    return self

  def __exit__(self, *exc):
    logging.getLogger("jax").removeHandler(self)
    self._log.__exit__(*exc)

  @property
  def total(self) -> int:
    return sum(self.names.values())


SIZES = [(64, 48), (48, 64), (70, 90), (90, 70), (120, 160), (100, 100), (75, 130), (160, 120)]


def test_mixed_sizes_compile_a_bounded_number_of_programs(tmp_path):
  """20 images of 8 sizes under the recorded protocol (keep-ratio resize to short side 64 at
  scales 0.75 and 1, 64 px windows every 32, flip): the model compiles once per window shape and
  batch of windows (9 programs measured: three window shapes as the 0.75 scale makes windows
  smaller than the crop, up to four batch sizes), the glue once per buffer bucket (29 measured:
  38 in all). The same sizes again compile nothing; 8 new sizes near them no model program
  (the part of a window inside the image is a traced size), only glue for new output buckets.
  The raw whole-image protocol compiles the model once per size."""
  b = bundle_lib.load_bundle(tiny_bundle(str(tmp_path / "bundle"), num_classes=8,
                                         class_names=list("abcdefgh")))
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (*SIZES[i % 8], 3), np.uint8) for i in range(20)]
  with Compilations() as first:
    for image in images[:8]:
      b.predict(image[None])
  assert first.total <= 40 and first.names["jit(model)"] <= 9, first.names
  with Compilations() as again:
    for image in images[8:]:  # 12 more images of the same 8 sizes
      out = b.predict(image[None])
      assert out.shape == (1, 8, *image.shape[:2])
  assert again.total == 0, again.names
  with Compilations() as near:
    for h, w in SIZES:
      b.predict(rng.integers(0, 256, (1, h + 1, w + 3, 3), np.uint8))
  assert near.names["jit(model)"] == 0 and near.total <= 8, near.names
  with Compilations() as whole:
    for image in images[:8]:
      b.predict(image[None], protocol="whole")
  assert whole.names["jit(model)"] == 8, whole.names


def test_4000x3000_photo_runs_through_the_windows(tmp_path):
  """The SegViT ADE20K protocol at its real sizes (short side 512, 512 px windows): a 12 MP
  photo is resized and windowed, the scores come back at 3000 x 4000; as one forward pass it
  is refused, naming the size and what to do, before anything compiles."""
  path = tiny_bundle(str(tmp_path / "bundle"), num_classes=4, class_names=list("abcd"),
                     **{"eval.scale": (2048, 512), "eval.crop_size": (512, 512),
                        "eval.stride": (341, 341), "eval.scales": (1.0,), "eval.flip": False})
  b = bundle_lib.load_bundle(path)
  photo = np.random.default_rng(0).integers(0, 256, (1, 3000, 4000, 3), np.uint8)
  scores = b.predict(photo)
  assert scores.shape == (1, 4, 3000, 4000) and np.isfinite(scores).all()
  with Compilations() as compiled, pytest.raises(
      ValueError, match=r"a 3000x4000 \(HxW\) test image in whole mode is one 3008x4000 "
      r"model input"):
    b.predict(photo, protocol="whole")
  assert compiled.total == 0


def test_windows_of_several_images_share_model_calls(tmp_path):
  """predict_many: windows of the same shape from several images (and both flips) go through
  the model together, `window_batch` at a time; each image's scores are what it gets alone."""
  b = bundle_lib.load_bundle(tiny_bundle(str(tmp_path / "bundle"), num_classes=8,
                                         class_names=list("abcdefgh"),
                                         **{"eval.scales": (1.0,), "eval.window_batch": 8}))
  predictor = b.predictor()
  calls = []
  model = predictor._model  # pylint: disable=protected-access
  predictor._model = lambda *a: calls.append(a[1].shape[0]) or model(*a)  # noqa: E731
  rng = np.random.default_rng(1)
  images = [rng.integers(0, 256, size + (3,), np.uint8) for size in [(64, 80), (70, 64),
                                                                     (64, 64), (90, 64)]]
  together = predictor.predict_many(images)
  # 14 windows of 64 x 64 ((2 + 2 + 1 + 2) x 2 flips): 8, then 6 padded to 8 (a power of two);
  # alone, each image is one call of 4, 4, 2 and 4 windows.
  assert calls == [8, 8]
  calls.clear()
  for image, total in zip(images, together):
    alone = predictor.predict(image)
    h, w = image.shape[:2]  # (beyond, the buffer's padding holds no scores)
    # Other batch sizes, other float32 rounding in the model's matmuls: 2e-6 measured.
    np.testing.assert_allclose(np.asarray(total)[:h, :w], np.asarray(alone)[:h, :w],
                               atol=1e-5, rtol=0)
  assert calls == [4, 4, 2, 4]


def test_ade20k_protocol_at_real_sizes_compiles_four_model_programs():
  """The SegViT ADE20K protocol at its real sizes (keep-ratio resize to (2048, 512), 512 px
  windows every 341, window batch 8, 64 px buckets) with a stand-in model (a 16 px patch
  model's output grid; what compiles depends on shapes only): images up to 4:1 become 512 x L,
  L in [512, 2048], 1 to 6 windows of 512 x 512, so the model compiles once per window batch
  1, 2, 4 and 8: at most 4 programs for any such images, and new sizes compile none. An image
  beyond 4:1 has its short side below the crop: one window shape per short side (a multiple
  of 16). The glue compiles per buffer bucket (README, "Compiled programs over a dataset")."""
  c = segvit_vit_b16_ade20k.get_config()
  protocol = inference.Protocol.from_config(c)
  assert (protocol.crop, protocol.stride, protocol.window_batch, protocol.bucket,
          protocol.padding.multiple) == ((512, 512), (341, 341), 8, 64, 16)

  def stand_in(params, x):  # (B, 2, h / 16, w / 16) scores
    return jnp.moveaxis(x[:, ::16, ::16, :2] * params["w"], -1, 1)

  predictor = inference.MultiScalePredictor(stand_in, {"w": jnp.ones(())}, protocol, 2,
                                            mean=c.mean, std=c.std)
  rng = np.random.default_rng(0)

  def predict(sizes):
    with Compilations() as compiled:
      for size in sizes:
        out = predictor.predict(rng.integers(0, 256, (*size, 3), np.uint8))
        assert out.shape[:2] == tuple(-(-s // 64) * 64 for s in size)
    return compiled.names

  # Test sizes 512 x 512, 683, 1024, 2048 and 683 x 512: 1, 2, 3, 6 and 2 windows.
  first = predict([(500, 500), (512, 683), (300, 600), (512, 2048), (683, 512)])
  assert first["jit(model)"] == 4, first
  # 5 test-size buckets x (acc and count zeros, the window sum) + 5 original-size buckets x
  # (total zeros, the view sum): measured.
  assert first == {"jit(model)": 4, "jit(<lambda>)": 15, "jit(_add_windows)": 5,
                   "jit(_add_view_scores)": 5}, first
  # Sizes never seen: 512 x 683 (2 windows) again from 1536 x 2048, 512 x 1536 (5 windows),
  # 1463 x 512 (4 windows): no model program.
  again = predict([(1536, 2048), (400, 1200), (2000, 700)])
  assert again["jit(model)"] == 0, again
  # A 8:1 panorama: 256 x 2048, six 256 x 512 windows: one more window shape.
  assert predict([(300, 2400)])["jit(model)"] == 1
  # `lower` (benchmarks/compile_time.py) compiles that program from abstract parameters.
  compiled = predictor.lower({"w": jax.ShapeDtypeStruct((), jnp.float32)}, 2, (512, 512)
                             ).compile()
  crops = rng.integers(0, 256, (2, 512, 512, 3), np.uint8)
  valid = np.full((2, 2), 512, np.int32)
  with predictor.activate():
    want = predictor._model(predictor.params, crops, valid, False)
    np.testing.assert_array_equal(compiled(predictor.params, crops, valid), want)
