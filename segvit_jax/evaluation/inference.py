"""Test-time inference: window layouts, whole / sliding-window / spread-window per-class scores,
the multi-scale + flip predictor that semantic evaluation runs (SegViT Sec. 4.2 "Evaluation
metric."; SegFormer Sec. 4.1 "Implementation details"; EoMT App. A.3 "Image processing."), and
the whole-image mask predictor of panoptic / instance evaluation (`MaskPredictor`, EoMT App.
A.3).

Window layouts (`window_layout`), on an image already resized by the test policy
(`segvit_jax.data.transforms.test_size`):

  slide   mmseg 0.x `slide_inference` (SegViT, SegFormer Cityscapes): windows of the crop size
          (a side smaller than the crop is one window of that side) every `stride` pixels,
          the last row / column shifted back to end at the border; window scores summed and
          divided by the per-pixel window count.
  spread  EoMT: along each side, ceil(side / crop) windows with the overlap spread evenly
          (start_j = int(j * (crop - overlap / (n - 1)))); after the short-side resize the short
          side is one window. Averaged the same way.
  whole   one window: the image itself, padded bottom / right to what the model needs.

Padding follows the model family's reference (`segvit_jax.models.PADDING_RULES`): a window
whose side is not a multiple of the rule's multiple (only the whole image, or a window where the
image side is smaller than the crop) is padded with zeros in normalised space (mmseg) or black
pixels (EoMT), and its scores come back to the unpadded window by a bilinear resize (mmseg's
`encode_decode`) or a crop (EoMT). A SegFormer takes every window as it is.

A `score_fn(images (B, H, W, 3) float) -> scores (B, C, H', W')` gives each window's scores,
bilinearly resized to the window (mmseg's `encode_decode`) in float32.

`whole_inference` / `slide_inference` / `predict_scores` are pure functions of static shapes: the
plain statement of the protocol the tests hold the fast path to. `MultiScalePredictor` is the
one path eval.py, predict.py and `Bundle.predict` run: windows of the same shape, from every
view of every image it is given, share model calls of `window_batch` windows, so the model
compiles once per window shape and batch size; the cheap glue (adding windows up, resizing to
the original size, softmax, flipping back) compiles once per image-size bucket: images sit in
buffers whose sides are multiples of `bucket` and the true sizes travel as traced integers, so
a dataset of many image sizes compiles a bounded number of programs, and the numbers are those
of the unpadded image.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from segvit_jax import sharding
from segvit_jax.data import transforms
from segvit_jax.models import Padding, input_padding, layers

ScoreFn = Callable[[jax.Array], jax.Array]
MODES = ("slide", "spread", "whole")
AVERAGES = ("softmax", "scores")

Window = tuple[int, int]
Layout = tuple[Window, list[tuple[int, int]]]


# ----------------------------------------------------------------------------------------------
# Window layouts (host, numpy).


def slide_windows(height: int, width: int, crop: Sequence[int],
                  stride: Sequence[int]) -> list[tuple[int, int, int, int]]:
  """mmseg `slide_inference` windows (y1, y2, x1, x2) over an (height, width) image.

  h_grids = max(H - h_crop + h_stride - 1, 0) // h_stride + 1 (same for w); window (i, j) is
  y1 = i * h_stride, y2 = min(y1 + h_crop, H), y1 = max(y2 - h_crop, 0) (same for x), so the
  last row / column of windows is shifted back to end at the border, and a side smaller than
  the crop is one window of that side.
  """
  h_crop, w_crop = crop
  h_stride, w_stride = stride
  if min(h_crop, w_crop, h_stride, w_stride) <= 0:
    raise ValueError(f"crop {tuple(crop)} and stride {tuple(stride)} must be positive")
  h_grids = max(height - h_crop + h_stride - 1, 0) // h_stride + 1
  w_grids = max(width - w_crop + w_stride - 1, 0) // w_stride + 1
  windows = []
  for i in range(h_grids):
    for j in range(w_grids):
      y2 = min(i * h_stride + h_crop, height)
      x2 = min(j * w_stride + w_crop, width)
      windows.append((max(y2 - h_crop, 0), y2, max(x2 - w_crop, 0), x2))
  return windows


def spread_starts(length: int, crop: int) -> list[int]:
  """EoMT's window starts along one side: ceil(length / crop) windows, the overlap spread
  evenly (`window_imgs_semantic`); one window at 0 when the side fits in the crop."""
  if crop <= 0:
    raise ValueError(f"crop {crop} must be positive")
  n = math.ceil(length / crop)
  overlap = n * crop - length
  per_window = overlap / (n - 1) if overlap > 0 and n > 1 else 0
  return [int(j * (crop - per_window)) for j in range(n)]


def window_layout(height: int, width: int, mode: str, crop: Sequence[int] | None,
                  stride: Sequence[int] | None, size_divisor: int) -> Layout:
  """((window_h, window_w), [(y, x) window origins]) for an (height, width) image.

  Where the image is smaller than the crop, the window is the image side rounded up to a
  multiple of `size_divisor` (the padding rule's multiple): the window then reaches into the
  padding below / right of the image (`valid_size` is the part inside it). "slide" needs `crop`
  and `stride`, "spread" `crop` (None where unused).
  """
  if mode == "slide" and (crop is None or stride is None):
    raise ValueError("mode='slide' needs crop and stride")
  if mode == "spread" and crop is None:
    raise ValueError("mode='spread' needs crop")
  d = max(int(size_divisor), 1)
  fit = lambda side, c: min(int(c), -(-side // d) * d)  # noqa: E731
  if mode == "slide":
    windows = slide_windows(height, width, crop, stride)
    return (fit(height, crop[0]), fit(width, crop[1])), [(w[0], w[2]) for w in windows]
  if mode == "spread":
    return (fit(height, crop[0]), fit(width, crop[1])), [
        (y, x) for y in spread_starts(height, int(crop[0]))
        for x in spread_starts(width, int(crop[1]))]
  if mode == "whole":
    return (-(-height // d) * d, -(-width // d) * d), [(0, 0)]
  raise ValueError(f"unknown inference mode {mode!r}; expected one of {MODES}")


def valid_size(height: int, width: int, window: Window) -> Window:
  """The part of every window of an (height, width) image's layout that lies inside it: the
  window, or the image side where the image is smaller (its one window then reaches into the
  padding)."""
  return _dim_min(window[0], height), _dim_min(window[1], width)


# min / max of sizes that may be symbolic (`jax.export`, whole mode: the window is the image
# rounded up): decided by `<=` / `>=`, which jax proves there where `<` is inconclusive; the
# same values as min / max for integers.
def _dim_min(a, b):
  return b if b <= a else a


def _dim_max(a, b):
  return b if b >= a else a


# ----------------------------------------------------------------------------------------------
# Static-shape inference of a batch (pure functions).


def resize_scores(scores: jax.Array, size: Sequence[int]) -> jax.Array:
  """Bilinear (align_corners=False, torch-identical) resize of (B, C, h, w) scores to
  (B, C, *size); a no-op when the size already matches."""
  return layers.upsample_masks(scores, tuple(size))


def _scores_at(score_fn: ScoreFn, images: jax.Array) -> jax.Array:
  """score_fn(images) checked and resized to the input's spatial size: (B, C, H, W)."""
  return resize_scores(_checked_scores(score_fn, images), images.shape[1:3])


def _checked_scores(score_fn: ScoreFn, images: jax.Array) -> jax.Array:
  """score_fn(images), checked to be (B, C, h, w), as float32 (bf16 model scores would lose the
  small differences when resized and averaged)."""
  scores = score_fn(images)
  if scores.ndim != 4 or scores.shape[0] != images.shape[0]:
    raise ValueError(f"score_fn must return (B, C, H, W) scores for {images.shape[0]} images, "
                     f"got shape {scores.shape}")
  return scores.astype(jnp.float32)


def window_scores(score_fn: ScoreFn, crops: jax.Array, valid: Window, back: str) -> jax.Array:
  """(B, C, wh, ww) scores of (B, wh, ww, 3) windows whose top-left `valid` part is inside the
  image: resized to the window ("crop": the part outside is cropped away later), or to the
  valid part ("resize", bilinear, once; the rest zeros)."""
  window = crops.shape[1:3]
  if back == "crop" or tuple(valid) == tuple(window):
    return _scores_at(score_fn, crops)
  scores = resize_scores(_checked_scores(score_fn, crops), valid)
  return jnp.pad(scores, ((0, 0), (0, 0), (0, window[0] - valid[0]), (0, window[1] - valid[1])))


def _pad_bottom_right(image: jax.Array, size: tuple[int, int], fill=0.0) -> jax.Array:
  """Pads a (B, H, W, 3) batch at the bottom / right to `size` with `fill` (a value or one per
  channel; no-op if it fits)."""
  b, h, w, c = image.shape
  if (h, w) == tuple(size):
    return image
  out = jnp.broadcast_to(jnp.asarray(fill, image.dtype), (b, *size, c))
  return jax.lax.dynamic_update_slice(out, image, (0, 0, 0, 0))


def pad_value(padding: Padding, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """The normalised value padding pixels take: 0 ("zero") or a black pixel's ("black")."""
  if padding.fill == "black":
    return (0.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  return np.zeros(3, np.float32)


def window_inference(score_fn: ScoreFn, image: jax.Array, layout: Layout,
                     num_classes: int | None = None, batch_size: int | None = None, *,
                     back: str = "crop", fill=0.0) -> jax.Array:
  """(B, C, H, W) float32 scores of a (B, H, W, 3) batch from the windows of `layout`.

  All B x N windows go through `score_fn` as (batch_size, *window, 3) chunks (default: one call
  with all of them; the last chunk is zero-padded to the full chunk so the model sees one shape,
  looped with `lax.map`). A window reaching beyond the image sees it padded bottom / right with
  `fill` (normalised values); its scores come back to the part inside the image by `back`
  ("crop", or "resize": bilinear). Window scores are summed and divided by the per-pixel window
  count.
  """
  b, h, w, _ = image.shape
  (wh, ww), starts = layout
  ph, pw = _dim_max(h, wh), _dim_max(w, ww)
  image = _pad_bottom_right(image, (ph, pw), fill)
  n = len(starts)
  vh, vw = valid_size(h, w, (wh, ww))
  crops = jnp.stack([image[:, y:y + wh, x:x + ww] for y, x in starts], axis=1)
  crops = crops.reshape(b * n, wh, ww, image.shape[-1])
  total = b * n
  chunk = total if batch_size is None else max(1, min(int(batch_size), total))
  num_chunks = -(-total // chunk)
  if num_chunks == 1:
    scores = window_scores(score_fn, crops, (vh, vw), back)
  else:
    crops = jnp.pad(crops, ((0, num_chunks * chunk - total), (0, 0), (0, 0), (0, 0)))
    crops = crops.reshape(num_chunks, chunk, wh, ww, crops.shape[-1])
    scores = jax.lax.map(lambda x: window_scores(score_fn, x, (vh, vw), back), crops)
    scores = scores.reshape(num_chunks * chunk, *scores.shape[2:])[:total]
  c = scores.shape[1]
  if num_classes is not None and c != num_classes:
    raise ValueError(f"score_fn returned {c} score channels, expected num_classes={num_classes}")
  if starts == [(0, 0)] and (vh, vw) == (h, w):
    # One window covering the image (whole mode): its scores as they are. (The same numbers as
    # the sum below, without its scatter-add, which jax2onnx's ONNX export cannot convert.)
    return scores[:, :, :h, :w]
  scores = scores.reshape(b, n, c, wh, ww)
  # The layout is static, so the per-pixel count is a numpy constant.
  count = np.zeros((ph, pw), np.float32)
  acc = jnp.zeros((b, c, ph, pw), jnp.float32)
  for k, (y, x) in enumerate(starts):
    count[y:y + vh, x:x + vw] += 1.0
    acc = acc.at[:, :, y:y + vh, x:x + vw].add(scores[:, k, :, :vh, :vw])
  assert count[:h, :w].min() >= 1, "windows leave pixels uncovered"
  return (acc / jnp.asarray(np.maximum(count, 1.0)))[:, :, :h, :w]


def whole_inference(score_fn: ScoreFn, image: jax.Array, size_divisor: int, *,
                    back: str = "crop", fill=0.0) -> jax.Array:
  """(B, C, H, W) float32 scores of a (B, H, W, 3) batch in one call, H and W padded (bottom /
  right, with `fill`) to the next multiple of `size_divisor`, the scores brought back by `back`
  (`window_inference`)."""
  _, h, w, _ = image.shape
  return window_inference(score_fn, image,
                          window_layout(h, w, "whole", None, None, size_divisor),
                          back=back, fill=fill)


def slide_inference(score_fn: ScoreFn, image: jax.Array, crop: Sequence[int],
                    stride: Sequence[int], size_divisor: int, num_classes: int | None = None,
                    batch_size: int | None = None, *, back: str = "crop",
                    fill=0.0) -> jax.Array:
  """(B, C, H, W) float32 sliding-window scores of a (B, H, W, 3) batch, mmseg 0.x semantics
  (`slide_windows`; see `window_inference` for the other arguments)."""
  _, h, w, _ = image.shape
  return window_inference(score_fn, image, window_layout(h, w, "slide", crop, stride,
                                                         size_divisor),
                          num_classes=num_classes, batch_size=batch_size, back=back, fill=fill)


def predict_scores(score_fn: ScoreFn, image: jax.Array, *, mode: str,
                   crop: Sequence[int] | None = None, stride: Sequence[int] | None = None,
                   num_classes: int | None = None, out_size: Sequence[int] | None = None,
                   size_divisor: int, batch_size: int | None = None, back: str = "crop",
                   fill=0.0) -> jax.Array:
  """(B, C, H, W) scores of a (B, H, W, 3) batch by `mode` (MODES), resized to `out_size` (the
  original label size, before the test resize) when given. "slide" needs `crop` and `stride`,
  "spread" needs `crop`; `back` and `fill` as in `window_inference`."""
  if mode not in MODES:
    raise ValueError(f"unknown inference mode {mode!r}; expected one of {MODES}")
  _, h, w, _ = image.shape
  layout = window_layout(h, w, mode, crop, stride, size_divisor)
  scores = window_inference(score_fn, image, layout, num_classes=num_classes,
                            batch_size=batch_size, back=back, fill=fill)
  if out_size is not None:
    scores = resize_scores(scores, out_size)
  return scores


# ----------------------------------------------------------------------------------------------
# Shape-polymorphic pieces: true sizes are traced, buffers are bucket-sized.


def bilinear_taps(out_len: int, in_size: jax.Array, out_size: jax.Array):
  """torch bilinear (align_corners=False, no antialias) taps along one axis for traced sizes:
  (i0, i1, w0, w1), each (out_len,), so out[j] = w0[j] * x[i0[j]] + w1[j] * x[i1[j]] for
  j < out_size. src = max((j + 0.5) * in / out - 0.5, 0), i0 = floor(src), i1 = min(i0 + 1,
  in - 1), w1 = src - i0 (as `upsample_bilinear2d`)."""
  scale = in_size.astype(jnp.float32) / out_size.astype(jnp.float32)
  src = jnp.maximum(scale * (jnp.arange(out_len, dtype=jnp.float32) + 0.5) - 0.5, 0.0)
  i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), in_size - 1)
  i1 = jnp.minimum(i0 + 1, in_size - 1)
  w1 = src - i0.astype(jnp.float32)
  return i0, i1, 1.0 - w1, w1


def resize_valid(x: jax.Array, in_size: tuple[jax.Array, jax.Array],
                 out_size: tuple[jax.Array, jax.Array], out_shape: tuple[int, int],
                 axes: tuple[int, int] = (-2, -1)) -> jax.Array:
  """Bilinear resize (torch-identical, align_corners=False) of the top-left `in_size` region of
  the two spatial `axes` of `x` to the top-left `out_size` region of `out_shape`; sizes may be
  traced. Values outside `out_size` are finite but meaningless. (Gathers of whole rows: with
  the channels last, (..., H, W, C) and axes (-3, -2), this is several times faster on a CPU
  than gathering single values along the minor axis.)"""
  for ax, n_in, n_out, length in zip(axes, in_size, out_size, out_shape):
    i0, i1, w0, w1 = bilinear_taps(length, jnp.asarray(n_in), jnp.asarray(n_out))
    ax = ax % x.ndim
    shape = [1] * x.ndim
    shape[ax] = length
    x = (jnp.take(x, i0, axis=ax) * w0.reshape(shape) + jnp.take(x, i1, axis=ax) *
         w1.reshape(shape))
  return x


def flip_valid(x: jax.Array, width: jax.Array, axis: int = -1) -> jax.Array:
  """Mirrors the first `width` (traced) entries along `axis`; the padding beyond stays put."""
  n = x.shape[axis]
  cols = jnp.arange(n)
  return jnp.take(x, jnp.where(cols < width, width - 1 - cols, cols), axis=axis)


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _add_windows(acc, count, scores, slot, ys, xs, valid):
  """Adds window scores (B, wh, ww, C) into acc (F, hb, wb, C) at their origins and counts the
  windows of view 0 per pixel in count (hb, wb); invalid (padding) windows add nothing."""
  _, wh, ww, c = scores.shape

  def body(k, carry):
    acc, count = carry
    v = valid[k].astype(jnp.float32)
    at = (slot[k], ys[k], xs[k], 0)
    acc = jax.lax.dynamic_update_slice(
        acc, jax.lax.dynamic_slice(acc, at, (1, wh, ww, c)) + v * scores[k][None], at)
    ones = jnp.full((wh, ww), v * (slot[k] == 0), jnp.float32)
    count = jax.lax.dynamic_update_slice(
        count, jax.lax.dynamic_slice(count, (ys[k], xs[k]), (wh, ww)) + ones, (ys[k], xs[k]))
    return acc, count

  return jax.lax.fori_loop(0, scores.shape[0], body, (acc, count))


@functools.partial(jax.jit, static_argnames=("softmax",), donate_argnums=(0,))
def _add_view_scores(total, acc, count, size, out_size, *, softmax):
  """total (Hb, Wb, C) + the window-averaged scores of every view (acc (F, hb, wb, C)), each
  resized to the original `out_size`, optionally softmaxed over classes, the mirror view
  flipped back."""
  avg = acc / jnp.maximum(count, 1.0)[..., None]
  out = resize_valid(avg, (size[0], size[1]), (out_size[0], out_size[1]), total.shape[:2],
                     axes=(1, 2))
  if softmax:
    out = jax.nn.softmax(out, axis=-1)
  if out.shape[0] == 2:
    out = out.at[1].set(flip_valid(out[1], out_size[1], axis=1))
  return total + out.sum(axis=0)


def _round_up(x: int, m: int) -> int:
  return -(-int(x) // int(m)) * int(m)


def chunk_sizes(n: int, batch: int, num_devices: int) -> list[int]:
  """Batch sizes covering n inputs: full `batch` chunks, then the rest rounded up to a power of
  two (few compiled shapes), all multiples of the device count."""
  full = _round_up(batch, num_devices)
  sizes = [full] * (n // full)
  rest = n - full * len(sizes)
  if rest:
    sizes.append(_round_up(min(full, 1 << (rest - 1).bit_length()), num_devices))
  return sizes


# Multi-scale test ratios allowed (the papers use 0.5 to 1.75): beyond, an image shrinks to a
# few pixels or grows past any window.
RATIO_RANGE = (0.1, 10.0)


def check_ratios(ratios: Sequence[Any], name: str) -> tuple[float, ...]:
  """Multi-scale test ratios as floats, each in `RATIO_RANGE`; ValueError naming `name` (the
  config key or flag) and what is allowed otherwise."""
  try:
    values = tuple(float(r) for r in ratios)
  except (TypeError, ValueError):
    values = ()
  lo, hi = RATIO_RANGE
  if not values or not all(lo <= r <= hi for r in values):  # (NaN compares False)
    shown = ",".join(str(r) for r in ratios) if isinstance(ratios, (list, tuple)) else ratios
    raise ValueError(f"{name}={shown}: expected one or more ratios from {lo} to {hi}, e.g. "
                     "0.5,0.75,1.0,1.25,1.5,1.75")
  return values


def _positive_pair(value: Any, name: str) -> tuple[int, int]:
  try:
    pair = tuple(int(v) for v in value)
  except (TypeError, ValueError):
    pair = ()
  if len(pair) != 2 or min(pair) < 1 or pair != tuple(value):
    raise ValueError(f"{name}={value}: expected two positive integers (h, w)")
  return pair


def check_protocol(ev) -> None:
  """Checks every test-protocol value of a `config.eval` section, naming the key and what is
  allowed (before anything is read or compiled)."""
  if ev.resize not in transforms.TEST_RESIZES:
    raise ValueError(f"config.eval.resize={ev.resize!r}: expected one of "
                     f"{transforms.TEST_RESIZES}")
  scale = tuple(ev.scale)
  if scale and (len(scale) != 2 or not all(isinstance(v, int) and v > 0 for v in scale)):
    raise ValueError(f"config.eval.scale={scale}: expected () or two positive integers "
                     f"(with resize {TEST_RESIZE_SCALES})")
  check_ratios(ev.scales, "config.eval.scales")
  if ev.mode not in MODES:
    raise ValueError(f"config.eval.mode={ev.mode!r}: expected one of {MODES}")
  crop = _positive_pair(ev.crop_size, "config.eval.crop_size")
  stride = _positive_pair(ev.stride, "config.eval.stride")
  if ev.mode == "slide" and (stride[0] > crop[0] or stride[1] > crop[1]):
    raise ValueError(f"config.eval.stride={stride} is larger than config.eval.crop_size="
                     f"{crop}: the windows would leave pixels uncovered")
  if ev.average not in AVERAGES:
    raise ValueError(f"config.eval.average={ev.average!r}: expected one of {AVERAGES}")
  for key in ("window_batch", "bucket", "size_divisor"):
    if not isinstance(ev[key], int) or ev[key] < 1:
      raise ValueError(f"config.eval.{key}={ev[key]!r}: expected a positive integer")
  if not isinstance(ev.min_size, int) or ev.min_size < 0:
    raise ValueError(f"config.eval.min_size={ev.min_size!r}: expected an integer >= 0")


TEST_RESIZE_SCALES = "keep_ratio: (long, short); short_side / long_side: (h, w)"
# The most pixels one model call may take (a 2048 x 2048 window): an image beyond it is for a
# windowed protocol, not one forward pass (a 4000 x 3000 photo through a ViT would ask for
# hundreds of GB of attention).
MAX_WINDOW_PIXELS = 2048 * 2048
# The `config.eval` of the raw whole-image output (`Protocol.whole`; predict.py --protocol
# whole): no resize, one view unless scales / flip say more, one window.
WHOLE_EVAL = dict(resize="none", scale=(), size_divisor=1, min_size=0, scales=(1.0,),
                  flip=False, mode="whole", crop_size=(1, 1), stride=(1, 1), average="softmax",
                  window_batch=8, bucket=32)
NO_RESIZE = transforms.MultiScaleResize(resize="none", scale=(), ratios=(1.0,), size_divisor=1,
                                        min_size=0)


@dataclasses.dataclass(frozen=True)
class Protocol:
  """How an image becomes scores at test time: the test resize (`test_resize`, one image per
  multi-scale ratio; `transforms.MultiScaleResize`, which evaluation's data pipeline applies
  in its reader threads) and the windows.

  mode / crop / stride: the window layout (MODES); flip: also predict the mirrored image;
  average: how views (scales x flips) combine at the original size: "softmax" (mmseg:
  per-pixel softmax probabilities averaged) or "scores" (semantic scores averaged, as
  mask-classification models do); window_batch: windows per model call; bucket: buffer sides
  are multiples of this; padding: the model family's padding rule
  (`segvit_jax.models.input_padding`). From a config (`from_config`, checked by
  `check_protocol`), or the raw whole image (`whole`).
  """
  mode: str
  crop: tuple[int, int]
  stride: tuple[int, int]
  flip: bool
  average: str
  window_batch: int
  bucket: int
  padding: Padding
  test_resize: transforms.MultiScaleResize = NO_RESIZE

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"config.eval.mode={self.mode!r}: expected one of {MODES}")
    if self.average not in AVERAGES:
      raise ValueError(f"config.eval.average={self.average!r}: expected one of {AVERAGES}")
    if self.window_batch < 1 or self.bucket < 1:
      raise ValueError(f"config.eval.window_batch={self.window_batch} and config.eval.bucket="
                       f"{self.bucket} must be positive")

  @property
  def views(self) -> int:
    """Views per image: scales x flips."""
    return len(self.test_resize.ratios) * (2 if self.flip else 1)

  @classmethod
  def from_config(cls, config) -> "Protocol":
    """The protocol of `config.eval` for the model of `config.model`."""
    ev = config.eval
    check_protocol(ev)
    return cls(mode=ev.mode, crop=tuple(ev.crop_size), stride=tuple(ev.stride),
               flip=bool(ev.flip), average=ev.average, window_batch=int(ev.window_batch),
               bucket=int(ev.bucket), padding=input_padding(config.model),
               test_resize=transforms.MultiScaleResize.from_config(ev))

  @classmethod
  def whole(cls, model_cfg) -> "Protocol":
    """The raw whole-image output: no resize, one view, one window (padded by the family's
    rule)."""
    return cls.from_config(ml_collections.ConfigDict({"eval": WHOLE_EVAL,
                                                       "model": model_cfg}))


def local_mesh() -> jax.sharding.Mesh:
  """A data-parallel mesh over this process's devices (evaluation runs per process)."""
  return sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.local_devices())


def local_replica(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """`tree` replicated on `mesh`. Arrays sharded over several processes (a training state) are
  gathered first; every process must call this together in that case."""
  if any(isinstance(x, jax.Array) and not x.is_fully_addressable for x in jax.tree.leaves(tree)):
    tree = multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_put(tree, NamedSharding(mesh, P()))


class LocalPredictor:
  """What both predictors share: this process's devices as a data-parallel mesh, the
  parameters replicated on it, and `activate()` (the mesh and the logical-axis rules, for every
  call: evaluation also runs inside a training loop, whose global mesh is then set aside)."""

  def __init__(self, params: Any, mesh: jax.sharding.Mesh | None = None):
    self.mesh = local_mesh() if mesh is None else mesh
    self.num_devices = self.mesh.devices.size
    self._repl = NamedSharding(self.mesh, P())
    self._batch = NamedSharding(self.mesh, P("data"))
    with self.activate():
      self.params = local_replica(params, self.mesh)

  def put(self, x: Any) -> jax.Array:
    """`x` replicated on this predictor's devices."""
    return jax.device_put(x, self._repl)

  @contextlib.contextmanager
  def activate(self):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
      yield


@dataclasses.dataclass
class _View:
  """One test-resized image of a job (one scale; with flip, its mirror too) while its windows
  are scored: its layout, uint8 buffers (the image, its mirror) and accumulators."""
  job: int
  size: tuple[int, int]
  window: Window
  valid: Window
  starts: list[tuple[int, int]]
  buffers: list[np.ndarray]
  pending: int
  acc: Any = None
  count: Any = None


def _views_of(chunk) -> list[_View]:
  """The distinct views a chunk's windows come from, in order."""
  return list({id(e[0]): e[0] for e in chunk}.values())


class MultiScalePredictor(LocalPredictor):
  """Multi-scale (+ flip) scores of images on this process's devices: the one semantic
  inference path of eval.py, predict.py and `Bundle.predict`.

    predictor = MultiScalePredictor(apply_fn, params, protocol, num_classes, mean=, std=)
    total = predictor(images, out_size)   # (Hb, Wb, C) on device; [:H, :W] is the image
    totals = predictor.predict_many([image, ...])  # from uint8 images, their windows batched

  `apply_fn(params, images (B, h, w, 3)) -> (B, C, h', w')` semantic scores; `images` are the
  uint8 test-resized images, one per scale (`protocol.test_resize`; evaluation's pipeline
  resizes in its reader threads, `predict_many` here); `out_size` is the original (H, W). The
  result is the sum over views (scales x flips) of softmax probabilities or scores at the
  original size (dividing by the view count would not change the argmax); its buffer is (H, W)
  rounded up to `protocol.bucket`, channels last (the layout the glue is fast in).

  Windows of the same shape, from every view of every image of a call, share model calls of
  `window_batch` windows (the last call of a shape is padded to a power of two): the model
  compiles once per window shape and batch size, the glue once per buffer bucket.
  """

  def __init__(self, apply_fn: Callable, params: Any, protocol: Protocol, num_classes: int, *,
               mean: Sequence[float], std: Sequence[float],
               mesh: jax.sharding.Mesh | None = None):
    super().__init__(params, mesh)
    self.protocol = protocol
    self.num_classes = int(num_classes)
    mean = jnp.asarray(np.asarray(mean, np.float32))
    std = jnp.asarray(np.asarray(std, np.float32))
    fill = protocol.padding.fill

    def model(params, crops, valid, stretch):
      """(B, wh, ww, C) scores of uint8 windows (B, wh, ww, 3) whose top-left valid[k] part is
      inside the image: normalised, the rest 0 (fill "zero") or black; the scores resized to
      the window, or with `stretch` (rule "resize", windows reaching beyond the image) to their
      valid part (`window_scores`; one program for every image size sharing the window)."""
      crops = jax.lax.with_sharding_constraint(crops, self._batch)
      x = (crops.astype(jnp.float32) - mean) / std
      if fill == "zero":
        rows, cols = jnp.arange(x.shape[1]), jnp.arange(x.shape[2])
        inside = ((rows[None, :, None] < valid[:, 0, None, None]) &
                  (cols[None, None, :] < valid[:, 1, None, None]))
        x = jnp.where(inside[..., None], x, 0.0)
      fn = lambda x: apply_fn(params, x)  # noqa: E731
      if not stretch:
        return jnp.moveaxis(_scores_at(fn, x), 1, -1)
      raw = jnp.moveaxis(_checked_scores(fn, x), 1, -1)
      return jax.vmap(lambda r, v: resize_valid(r, r.shape[:2], (v[0], v[1]), x.shape[1:3],
                                                axes=(0, 1)))(raw, valid)

    self._model = jax.jit(model, static_argnums=3, out_shardings=self._repl)
    # Accumulators start on the devices (no host allocation and transfer of C x H x W zeros).
    self._zeros = jax.jit(lambda shape: jnp.zeros(shape, jnp.float32), static_argnums=0,
                          out_shardings=self._repl)

  def chunk_sizes(self, n: int) -> list[int]:
    """`chunk_sizes` of n windows for this predictor's window batch and devices."""
    return chunk_sizes(n, self.protocol.window_batch, self.num_devices)

  def lower(self, variables: Any, batch: int, window: Window, stretch: bool = False):
    """The model program `run` calls for `batch` windows of `window`, lowered from `variables`
    that may be abstract (ShapeDtypeStructs): `.compile()` compiles it with no parameter in
    memory (benchmarks/compile_time.py)."""
    crops = jax.ShapeDtypeStruct((batch, *window, 3), jnp.uint8, sharding=self._batch)
    valid = jax.ShapeDtypeStruct((batch, 2), jnp.int32, sharding=self._batch)
    with self.activate():
      return self._model.lower(variables, crops, valid, stretch)

  def predict_many(self, images: Sequence[np.ndarray]) -> list[jax.Array]:
    """The summed view scores of uint8 (H, W, 3) `images` under the protocol (its test resize,
    then `run`): one (Hb, Wb, C) array on the devices each, [:H, :W] the image."""
    resize = self.protocol.test_resize
    return self.run([(resize.map({"image": im})["images"], im.shape[:2]) for im in images])

  def predict(self, image: np.ndarray) -> jax.Array:
    """`predict_many` of one image."""
    return self.predict_many([image])[0]

  def mean_scores(self, total: jax.Array, size: Sequence[int]) -> np.ndarray:
    """(C, H, W) float32 on the host from `predict`'s total for an image of `size`: the model's
    scores for one view, else the mean over views of the softmax probabilities (average
    "softmax") or of the scores."""
    scores = np.asarray(total, np.float32)[:size[0], :size[1]]
    return np.moveaxis(scores / np.float32(self.protocol.views), -1, 0)

  def layout(self, height: int, width: int) -> Layout:
    """`window_layout` of a test image under the protocol; ValueError for a window beyond
    `MAX_WINDOW_PIXELS`."""
    p = self.protocol
    window, starts = window_layout(height, width, p.mode, p.crop, p.stride, p.padding.multiple)
    if window[0] * window[1] > MAX_WINDOW_PIXELS:
      raise ValueError(
          f"a {height}x{width} (HxW) test image in {p.mode} mode is one {window[0]}x"
          f"{window[1]} model input, more than one forward pass should take "
          f"({MAX_WINDOW_PIXELS} pixels): use a windowed test protocol (config.eval.mode "
          "'slide' or 'spread'; predict.py: a bundle that records one, or --config) or a test "
          "resize")
    return window, starts

  def __call__(self, images: Sequence[np.ndarray], out_size: tuple[int, int]) -> jax.Array:
    return self.run([(images, out_size)])[0]

  def _view(self, job: int, image: np.ndarray) -> _View:
    p = self.protocol
    h, w = image.shape[:2]
    window, starts = self.layout(h, w)
    hb = _round_up(max(h, window[0]), p.bucket)
    wb = _round_up(max(w, window[1]), p.bucket)
    buffers = []
    for mirrored in range(2 if p.flip else 1):
      buf = np.zeros((hb, wb, 3), np.uint8)
      buf[:h, :w] = image[:, ::-1] if mirrored else image
      buffers.append(buf)
    return _View(job, (h, w), window, valid_size(h, w, window), starts, buffers,
                 pending=len(buffers) * len(starts))

  def run(self, jobs: Sequence[tuple[Sequence[np.ndarray], tuple[int, int]]]
          ) -> list[jax.Array]:
    """The summed view scores of each job (its test-resized images, its original size): one
    (Hb, Wb, C) array on the devices each. Every window of every view, grouped by window shape,
    goes through the model `window_batch` at a time."""
    p = self.protocol
    views = [self._view(j, image) for j, (images, _) in enumerate(jobs) for image in images]
    groups: dict[tuple[Window, bool], list[tuple[_View, int, int, int]]] = {}
    for v in views:
      stretch = p.padding.back == "resize" and v.valid != v.window
      groups.setdefault((v.window, stretch), []).extend(
          (v, slot, y, x) for slot in range(len(v.buffers)) for y, x in v.starts)
    totals: list[Any] = [None] * len(jobs)
    with self.activate():
      for (window, stretch), entries in groups.items():
        start = 0
        for n in self.chunk_sizes(len(entries)):
          chunk = entries[start:start + n]
          start += n
          self._score_chunk(chunk, n, window, stretch)
          for v in _views_of(chunk):
            v.pending -= sum(e[0] is v for e in chunk)
            if not v.pending:  # all its windows are in: add the view to its job's total
              totals[v.job] = self._finish(v, totals[v.job], jobs[v.job])
    return totals

  def _score_chunk(self, chunk, n: int, window: Window, stretch: bool) -> None:
    """Scores one model call's windows (padded to n) into their views' accumulators."""
    wh, ww = window
    crops = np.zeros((n, wh, ww, 3), np.uint8)
    valid = np.zeros((n, 2), np.int32)
    for k, (v, slot, y, x) in enumerate(chunk):
      crops[k] = v.buffers[slot][y:y + wh, x:x + ww]
      valid[k] = v.valid
    scores = self._model(self.params, jax.device_put(crops, self._batch),
                         jax.device_put(valid, self._batch), stretch)
    if scores.shape[-1] != self.num_classes:
      raise ValueError(f"the model returned {scores.shape[-1]} score channels, expected "
                       f"num_classes={self.num_classes}")
    table = np.zeros((n, 3), np.int32)
    table[:len(chunk)] = [(slot, y, x) for _, slot, y, x in chunk]
    for v in _views_of(chunk):
      if v.acc is None:
        hb, wb = v.buffers[0].shape[:2]
        v.acc = self._zeros((len(v.buffers), hb, wb, self.num_classes))
        v.count = self._zeros((hb, wb))
      mine = np.asarray([k < len(chunk) and chunk[k][0] is v for k in range(n)], np.int32)
      v.acc, v.count = _add_windows(v.acc, v.count, scores, table[:, 0], table[:, 1],
                                    table[:, 2], mine)

  def _finish(self, v: _View, total: Any, job) -> jax.Array:
    """`total` (created on first use) plus view `v`'s window-averaged scores at the original
    size (softmax probabilities where several views combine with average "softmax")."""
    images, out_size = job
    p = self.protocol
    views = len(images) * (2 if p.flip else 1)
    if total is None:
      total = self._zeros((_round_up(out_size[0], p.bucket), _round_up(out_size[1], p.bucket),
                           self.num_classes))
    total = _add_view_scores(total, v.acc, v.count, self.put(np.asarray(v.size, np.int32)),
                             self.put(np.asarray(out_size, np.int32)),
                             softmax=p.average == "softmax" and views > 1)
    v.acc = v.count = v.buffers = None  # free the view's buffers
    return total


# ----------------------------------------------------------------------------------------------
# Whole-image mask predictions (panoptic / instance protocol).


@functools.partial(jax.jit, static_argnames=("input_size", "out_shape"))
def masks_at_size(mask_logits: jax.Array, valid: jax.Array, out_size: jax.Array, *,
                  input_size: tuple[int, int], out_shape: tuple[int, int]) -> jax.Array:
  """Mask logits of one padded input at the original image size, EoMT's
  `revert_resize_and_pad_logits_instance_panoptic`: (K, h', w') logits (the head's 1/4 grid)
  bilinearly upsampled to the padded `input_size`, the top-left `valid` (h, w) region (the
  test-resized image) resized bilinearly to `out_size` (H, W) (both torch-identical,
  align_corners=False). Returns (Hb, Wb, K) float32, channels last, in an `out_shape` buffer
  whose [:H, :W] is the image (sizes traced: one program per buffer shape)."""
  up = layers.upsample_masks(mask_logits[None].astype(jnp.float32), input_size)[0]
  up = jnp.moveaxis(up, 0, -1)  # (S, S, K): resizing whole rows is fast on every backend
  return resize_valid(up, (valid[0], valid[1]), (out_size[0], out_size[1]), out_shape,
                      axes=(0, 1))


class MaskPredictor(LocalPredictor):
  """Mask-classification outputs of whole images at EoMT's panoptic / instance protocol (spec
  eomt.md, "Inference"), on this process's devices:

    predictor = MaskPredictor(apply_fn, params, input_size=(640, 640), mean=..., std=...)
    class_logits, mask_logits = predictor.logits(images)      # (B, K, C + 1), (B, K, h', w')
    masks = predictor.at_size(mask_logits[i], images[i].shape[:2], (H, W))  # (Hb, Wb, K)

  `images` are uint8 test-resized images (`transforms.test_size` "long_side": the longer side
  is the input size) that fit in `input_size`; each is padded with zeros at the bottom / right
  to the (square) input, as uint8, so the padding is black after normalising (EoMT pads the
  uint8 image before its normalisation); the batch (up to `batch` images per call, a multiple
  of the device count, sharded over them) goes through the model once. `at_size` takes one
  image's mask logits back to its original size (`masks_at_size`), in a buffer whose sides are
  multiples of `bucket`. `apply_fn(params, images (B, S, S, 3) float) -> (class_logits,
  mask_logits)`.
  """

  def __init__(self, apply_fn: Callable, params: Any, input_size: Sequence[int], *,
               mean: Sequence[float], std: Sequence[float], batch: int = 1, bucket: int = 64,
               mesh: jax.sharding.Mesh | None = None):
    super().__init__(params, mesh)
    self.input_size = (int(input_size[0]), int(input_size[1]))
    self.batch, self.bucket = max(int(batch), 1), max(int(bucket), 1)
    mean = jnp.asarray(np.asarray(mean, np.float32))
    std = jnp.asarray(np.asarray(std, np.float32))

    def model(params, images):
      x = (jax.lax.with_sharding_constraint(images, self._batch).astype(jnp.float32) - mean) / std
      class_logits, mask_logits = apply_fn(params, x)
      return class_logits.astype(jnp.float32), mask_logits.astype(jnp.float32)

    self._model = jax.jit(model, out_shardings=self._repl)

  def lower(self, variables: Any, batch: int):
    """The model program `logits` calls for `batch` inputs, lowered from `variables` that may be
    abstract (ShapeDtypeStructs), as `MultiScalePredictor.lower`."""
    spec = jax.ShapeDtypeStruct((batch, *self.input_size, 3), jnp.uint8, sharding=self._batch)
    with self.activate():
      return self._model.lower(variables, spec)

  def padded(self, images: Sequence[np.ndarray], size: int) -> np.ndarray:
    """(size, S, S, 3) uint8: `images` at the top-left of black inputs (the rest all black)."""
    s0, s1 = self.input_size
    buf = np.zeros((size, s0, s1, 3), np.uint8)
    for i, image in enumerate(images):
      h, w = image.shape[:2]
      if h > s0 or w > s1:
        raise ValueError(f"a test-resized image of {h}x{w} (HxW) does not fit the {s0}x{s1} "
                         "model input: resize with config.eval.resize='long_side' to "
                         "config.eval.scale = the input size")
      buf[i, :h, :w] = image
    return buf

  def logits(self, images: Sequence[np.ndarray]) -> tuple[jax.Array, jax.Array]:
    """(class_logits (B, K, C + 1), mask_logits (B, K, h', w')) float32 on the devices (not
    waited for) of up to `batch` images; B >= len(images) (the rest is padding)."""
    if not 0 < len(images) <= chunk_sizes(self.batch, self.batch, self.num_devices)[0]:
      raise ValueError(f"{len(images)} images per call; expected 1..{self.batch}")
    size = chunk_sizes(len(images), self.batch, self.num_devices)[0]
    with self.activate():
      return self._model(self.params, jax.device_put(self.padded(images, size), self._batch))

  def at_size(self, mask_logits: jax.Array, valid: Sequence[int],
              out_size: Sequence[int]) -> jax.Array:
    """`masks_at_size` of one image's (K, h', w') mask logits: (Hb, Wb, K) on the devices."""
    out_shape = (_round_up(out_size[0], self.bucket), _round_up(out_size[1], self.bucket))
    with self.activate():
      return masks_at_size(mask_logits, self.put(np.asarray(valid, np.int32)),
                           self.put(np.asarray(out_size, np.int32)),
                           input_size=self.input_size, out_shape=out_shape)
