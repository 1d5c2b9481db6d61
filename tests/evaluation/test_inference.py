"""Whole / sliding-window inference against pointwise and hand-computed score functions."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segvit_jax.evaluation import inference
from segvit_jax.data import transforms as T

C = 4
_W = jnp.asarray(np.random.default_rng(0).normal(size=(3, C)), jnp.float32)
_B = jnp.asarray([0.1, -0.2, 0.3, 0.0], jnp.float32)


def pointwise_scores(x: jax.Array) -> jax.Array:
  """Per-pixel linear map (B, H, W, 3) -> (B, C, H, W): any window tiling gives the same."""
  return jnp.einsum("bhwc,ck->bkhw", x, _W, precision="highest") + _B[None, :, None, None]


def _image(b, h, w, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(b, h, w, 3)), jnp.float32)


@pytest.mark.parametrize("h,w,crop,stride", [
    (20, 30, (16, 16), (10, 10)),  # windows overlap in both directions, last ones shifted
    (8, 12, (16, 16), (10, 10)),  # smaller than the crop: padded, one window
    (16, 40, (16, 16), (12, 12)),  # height exactly the crop
    (33, 17, (12, 20), (8, 6)),  # non-square crop and stride; width smaller than the crop
    (45, 45, (16, 16), (16, 16)),  # stride = crop: tiling plus one shifted window
])
def test_slide_equals_whole_for_pointwise_scores(h, w, crop, stride):
  image = _image(2, h, w)
  whole = inference.whole_inference(pointwise_scores, image, size_divisor=16)
  slide = jax.jit(functools.partial(inference.slide_inference, pointwise_scores, crop=crop,
                                    stride=stride, size_divisor=16, num_classes=C))(image)
  assert whole.shape == slide.shape == (2, C, h, w)
  np.testing.assert_allclose(np.asarray(slide), np.asarray(whole), atol=1e-6, rtol=0)
  np.testing.assert_allclose(np.asarray(whole), np.asarray(pointwise_scores(image)), atol=1e-6)


def top_left_constant(x: jax.Array) -> jax.Array:
  """Each window's score is its top-left pixel's channel 0, everywhere: (B, 1, h, w)."""
  return jnp.broadcast_to(x[:, :1, :1, 0][:, None], (x.shape[0], 1) + x.shape[1:3])


def test_overlap_averaging_hand_computed():
  # Pixel value = its column, W = 30, crop 16, stride 10: w_grids = (30-16+9)//10+1 = 3 windows
  # starting at x = 0, 10 and (min(20+16, 30) - 16 =) 14. Column 12 is under windows 0 and 10:
  # (0 + 10) / 2 = 5; column 15 under all three: (0 + 10 + 14) / 3 = 8; column 5 only under
  # x = 0; column 28 only under x = 14.
  cols = jnp.broadcast_to(jnp.arange(30, dtype=jnp.float32)[None, None, :, None], (1, 16, 30, 3))
  out = inference.slide_inference(top_left_constant, cols, (16, 16), (10, 10), 16)
  assert out.shape == (1, 1, 16, 30)
  row = np.asarray(out[0, 0, 7])
  assert row[12] == pytest.approx(5.0, abs=1e-6)
  assert row[15] == pytest.approx(8.0, abs=1e-6)
  assert row[5] == pytest.approx(0.0, abs=1e-6)
  assert row[28] == pytest.approx(14.0, abs=1e-6)
  np.testing.assert_allclose(np.asarray(out[0, 0]), np.broadcast_to(row, (16, 30)))


@pytest.mark.parametrize("h,w,crop,stride,grid", [
    (512, 683, (512, 512), (341, 341), (1, 2)),  # COCO-Stuff test setting
    (640, 853, (640, 640), (608, 608), (1, 2)),  # ADE20K ViT-L test setting
    (480, 640, (480, 480), (320, 320), (1, 2)),  # PASCAL-Context test setting
    (1000, 700, (512, 512), (341, 341), (3, 2)),  # (1000-512+340)//341+1 = 3
    (300, 200, (512, 512), (341, 341), (1, 1)),
])
def test_window_count_matches_mmseg_formula(h, w, crop, stride, grid):
  windows = inference.slide_windows(h, w, crop, stride)
  h_grids = max(h - crop[0] + stride[0] - 1, 0) // stride[0] + 1
  w_grids = max(w - crop[1] + stride[1] - 1, 0) // stride[1] + 1
  assert (h_grids, w_grids) == grid
  assert len(windows) == h_grids * w_grids
  for y1, y2, x1, x2 in windows:
    assert 0 <= y1 < y2 <= h and 0 <= x1 < x2 <= w
    assert y2 - y1 == min(crop[0], h) and x2 - x1 == min(crop[1], w)
  assert max(y2 for _, y2, _, _ in windows) == h and max(x2 for *_, x2 in windows) == w


def test_slide_calls_model_with_one_fixed_shape_and_batches():
  shapes = []

  def recording(x):
    shapes.append(x.shape)
    return pointwise_scores(x)

  image = _image(2, 20, 30, seed=1)  # per image 2 x 3 windows of 16 x 16 at stride 10
  full = inference.slide_inference(recording, image, (16, 16), (10, 10), 16)
  assert shapes == [(12, 16, 16, 3)]
  shapes.clear()
  chunked = jax.jit(functools.partial(inference.slide_inference, recording, crop=(16, 16),
                                      stride=(10, 10), size_divisor=16, batch_size=5))(image)
  assert shapes == [(5, 16, 16, 3)]  # 12 windows -> 3 chunks of 5 (last zero-padded), one trace
  np.testing.assert_allclose(np.asarray(chunked), np.asarray(full), atol=1e-6, rtol=0)


def test_whole_pads_to_size_divisor_and_resizes_low_resolution_scores():
  shapes = []

  def quarter_res(x):  # a SegFormer-like head: scores at 1/4 of the input
    shapes.append(x.shape)
    b, h, w, _ = x.shape
    return pointwise_scores(x).reshape(b, C, h // 4, 4, w // 4, 4).mean(axis=(3, 5))

  image = _image(1, 20, 30, seed=2)
  out = inference.whole_inference(quarter_res, image, size_divisor=16)
  assert shapes == [(1, 32, 32, 3)]
  padded = jnp.pad(image, ((0, 0), (0, 12), (0, 2), (0, 0)))
  expected = inference.resize_scores(quarter_res(padded), (32, 32))[:, :, :20, :30]
  assert out.shape == (1, C, 20, 30)
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-6)


def test_resize_scores_matches_torch_bilinear():
  torch = pytest.importorskip("torch")
  scores = np.random.default_rng(3).normal(size=(2, C, 7, 9)).astype(np.float32)
  ours = inference.resize_scores(jnp.asarray(scores), (20, 13))
  ref = torch.nn.functional.interpolate(torch.from_numpy(scores), size=(20, 13),
                                        mode="bilinear", align_corners=False)
  np.testing.assert_allclose(np.asarray(ours), ref.numpy(), atol=1e-5)


def test_predict_scores_modes_and_out_size():
  image = _image(1, 24, 40, seed=4)
  slide = inference.predict_scores(pointwise_scores, image, mode="slide", crop=(16, 16),
                                   stride=(8, 8), num_classes=C, out_size=(30, 50),
                                   size_divisor=16)
  whole = inference.predict_scores(pointwise_scores, image, mode="whole", out_size=(30, 50),
                                   size_divisor=16)
  expected = inference.resize_scores(pointwise_scores(image), (30, 50))
  assert slide.shape == whole.shape == (1, C, 30, 50)
  np.testing.assert_allclose(np.asarray(slide), np.asarray(expected), atol=1e-5)
  np.testing.assert_allclose(np.asarray(whole), np.asarray(expected), atol=1e-5)


def test_predict_scores_errors():
  image = _image(1, 16, 16)
  with pytest.raises(ValueError, match="unknown inference mode 'multi'"):
    inference.predict_scores(pointwise_scores, image, mode="multi", size_divisor=16)
  with pytest.raises(ValueError, match="mode='slide' needs crop and stride"):
    inference.predict_scores(pointwise_scores, image, mode="slide", size_divisor=16)
  with pytest.raises(ValueError, match="returned 4 score channels, expected num_classes=150"):
    inference.slide_inference(pointwise_scores, image, (16, 16), (8, 8), 16, num_classes=150)


@pytest.mark.parametrize("h,w,scale,expected", [
    (480, 640, (2048, 512), (512, 683)),  # factor 512/480: 640 * 1.0667 = 682.67 -> 683
    (375, 500, (2048, 512), (512, 683)),  # factor 512/375: 500 * 1.3653 = 682.67 -> 683
    (512, 512, (2048, 512), (512, 512)),
    (100, 1000, (2048, 512), (205, 2048)),  # long side hits 2048 first: factor 2.048
    (100, 1000, (512, 2048), (205, 2048)),  # (short, long) order reads the same
    (1024, 768, (2048, 640), (853, 640)),  # shrink: factor 640/768, 1024 * 0.8333 = 853.33
])
def test_keep_ratio_size(h, w, scale, expected):
  assert T.rescale_size(h, w, scale) == expected


@pytest.mark.parametrize("length,crop,expected", [
    (1100, 512, [0, 294, 588]),  # 3 windows, overlap 436 spread as 218: int(j * 294)
    (512, 512, [0]),  # the short side after EoMT's resize: one window
    (1024, 512, [0, 512]),  # no overlap
    (300, 512, [0]),  # smaller than the crop
    (1025, 512, [0, 256, 513]),  # overlap 511 / 2 = 255.5: int(256.5) = 256, int(513.0)
])
def test_spread_starts_hand_computed(length, crop, expected):
  starts = inference.spread_starts(length, crop)
  assert starts == expected
  assert starts[-1] + crop >= length  # the last window reaches the end


def test_window_layouts():
  # mmseg slide on 512 x 683 at 512 / 341: one row, windows at x = 0 and 683 - 512 = 171.
  assert inference.window_layout(512, 683, "slide", (512, 512), (341, 341), 16) == (
      (512, 512), [(0, 0), (0, 171)])
  # A side smaller than the crop is one window, rounded up to whole patches (384 already is;
  # 360 becomes 368 = 23 x 16 and reaches 8 px into the padding).
  assert inference.window_layout(384, 683, "slide", (512, 512), (341, 341), 16)[0] == (384, 512)
  assert inference.window_layout(360, 480, "slide", (480, 480), (320, 320), 16) == (
      (368, 480), [(0, 0)])
  # EoMT: short side = crop, evenly spread windows along the long side.
  assert inference.window_layout(1100, 512, "spread", (512, 512), None, 16) == (
      (512, 512), [(0, 0), (294, 0), (588, 0)])
  assert inference.window_layout(500, 700, "whole", None, None, 32) == ((512, 704), [(0, 0)])
  with pytest.raises(ValueError, match="unknown inference mode 'tiles'"):
    inference.window_layout(10, 10, "tiles", (512, 512), (341, 341), 16)
