"""Test-time inference: whole-image and sliding-window per-class scores (spec segvit.md,
"Training recipes", Test: keep-ratio resize to (2048, crop), sliding window with the dataset's
crop / stride, window scores averaged).

Everything here is a pure function of a `score_fn` and an image batch, so eval.py and predict.py
can wrap it in `jax.jit` for a static image shape:

  score_fn(images (B, H, W, 3) float) -> scores (B, C, H', W')

e.g. `lambda x: model.apply(params, x)["semantic_scores"]`. Scores at another resolution than
the input (H', W' != H, W) are bilinearly resized to the input, as mmseg's `encode_decode`
does. Sliding windows are all cut at the crop size and sent through `score_fn` in batches of a
fixed shape, so the model is traced and compiled once per image shape.

Padding differs from mmseg 0.x in one place, on purpose: an image smaller than the crop is
padded (bottom / right, zeros = the normalised mean) to the crop instead of running the model on
a smaller window, to keep the model's input shape fixed; the padded scores are cropped away.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from segvit_jax.data import transforms
from segvit_jax.models import layers

ScoreFn = Callable[[jax.Array], jax.Array]


def keep_ratio_size(h: int, w: int, scale: Sequence[int]) -> tuple[int, int]:
  """mmseg's keep-ratio test resize of an (h, w) image to `scale` = (long, short): factor =
  min(long / max(h, w), short / min(h, w)), new size int(dim * factor + 0.5).

  E.g. 480 x 640 at (2048, 512) -> 512 x 683. The one implementation lives in
  `segvit_jax.data.transforms.rescale_size` (the data pipeline uses it too).
  """
  return transforms.rescale_size(h, w, scale)


def resize_scores(scores: jax.Array, size: Sequence[int]) -> jax.Array:
  """Bilinear (align_corners=False, torch-identical) resize of (B, C, h, w) scores to
  (B, C, *size); a no-op when the size already matches."""
  return layers.upsample_masks(scores, tuple(size))


def _pad_bottom_right(image: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Zero-pads a (B, H, W, 3) batch at the bottom / right to `size` (no-op if it fits)."""
  _, h, w, _ = image.shape
  if (h, w) == size:
    return image
  return jnp.pad(image, ((0, 0), (0, size[0] - h), (0, size[1] - w), (0, 0)))


def _scores_at(score_fn: ScoreFn, images: jax.Array) -> jax.Array:
  """score_fn(images) checked and resized to the input's spatial size: (B, C, H, W)."""
  scores = score_fn(images)
  if scores.ndim != 4 or scores.shape[0] != images.shape[0]:
    raise ValueError(f"score_fn must return (B, C, H, W) scores for {images.shape[0]} images, "
                     f"got shape {scores.shape}")
  # float32 before resizing / averaging: bf16 model scores would lose the small differences.
  return resize_scores(scores.astype(jnp.float32), images.shape[1:3])


def whole_inference(score_fn: ScoreFn, image: jax.Array, size_divisor: int = 16) -> jax.Array:
  """(B, C, H, W) float32 scores of a (B, H, W, 3) batch in one call.

  H and W are zero-padded (bottom / right) to the next multiple of `size_divisor` (the patch
  size: a ViT needs whole patches), the scores are resized to the padded size and cropped back.
  """
  _, h, w, _ = image.shape
  size_divisor = max(int(size_divisor), 1)
  padded = (-(-h // size_divisor) * size_divisor, -(-w // size_divisor) * size_divisor)
  scores = _scores_at(score_fn, _pad_bottom_right(image, padded))
  return scores[:, :, :h, :w]


def slide_windows(height: int, width: int, crop: Sequence[int],
                  stride: Sequence[int]) -> list[tuple[int, int, int, int]]:
  """mmseg `slide_inference` windows (y1, y2, x1, x2) over an (height, width) image.

  h_grids = max(H - h_crop + h_stride - 1, 0) // h_stride + 1 (same for w); window (i, j) is
  y1 = i * h_stride, y2 = min(y1 + h_crop, H), y1 = max(y2 - h_crop, 0) (same for x), so the
  last row / column of windows is shifted back to end at the border.
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


def slide_inference(score_fn: ScoreFn, image: jax.Array, crop: Sequence[int],
                    stride: Sequence[int], num_classes: int | None = None,
                    batch_size: int | None = None) -> jax.Array:
  """(B, C, H, W) float32 sliding-window scores of a (B, H, W, 3) batch, mmseg semantics.

  Windows come from `slide_windows` on the image padded (bottom / right, zeros) to at least the
  crop, so every window is exactly `crop`. All B x N windows go through `score_fn` as
  (batch_size, h_crop, w_crop, 3) chunks (default: one call with all of them; the last chunk is
  zero-padded to the full chunk so the model sees one shape, looped with `lax.map`). Window
  scores are summed into an accumulator and divided by the per-pixel window count; the result
  is cropped back to (H, W). `num_classes`, if given, is checked against the scores.
  """
  b, h, w, _ = image.shape
  h_crop, w_crop = int(crop[0]), int(crop[1])
  ph, pw = max(h, h_crop), max(w, w_crop)
  image = _pad_bottom_right(image, (ph, pw))
  windows = slide_windows(ph, pw, (h_crop, w_crop), stride)
  n = len(windows)

  # (B * N, h_crop, w_crop, 3), image-major.
  crops = jnp.stack([image[:, y1:y2, x1:x2] for y1, y2, x1, x2 in windows], axis=1)
  crops = crops.reshape(b * n, h_crop, w_crop, image.shape[-1])
  total = b * n
  chunk = total if batch_size is None else max(1, min(int(batch_size), total))
  num_chunks = -(-total // chunk)
  if num_chunks == 1:
    scores = _scores_at(score_fn, crops)
  else:
    extra = num_chunks * chunk - total
    crops = jnp.pad(crops, ((0, extra), (0, 0), (0, 0), (0, 0)))
    crops = crops.reshape(num_chunks, chunk, h_crop, w_crop, crops.shape[-1])
    scores = jax.lax.map(lambda x: _scores_at(score_fn, x), crops)
    scores = scores.reshape(num_chunks * chunk, *scores.shape[2:])[:total]
  c = scores.shape[1]
  if num_classes is not None and c != num_classes:
    raise ValueError(f"score_fn returned {c} score channels, expected num_classes={num_classes}")
  scores = scores.reshape(b, n, c, h_crop, w_crop)

  # The window layout is static, so the per-pixel count is a numpy constant.
  count = np.zeros((ph, pw), np.float32)
  acc = jnp.zeros((b, c, ph, pw), jnp.float32)
  for k, (y1, y2, x1, x2) in enumerate(windows):
    count[y1:y2, x1:x2] += 1.0
    acc = acc.at[:, :, y1:y2, x1:x2].add(scores[:, k])
  assert count.min() >= 1, "slide windows leave pixels uncovered"
  return (acc / jnp.asarray(count))[:, :, :h, :w]


def predict_scores(score_fn: ScoreFn, image: jax.Array, *, mode: str = "whole",
                   crop: Sequence[int] | None = None, stride: Sequence[int] | None = None,
                   num_classes: int | None = None, out_size: Sequence[int] | None = None,
                   size_divisor: int = 16, batch_size: int | None = None) -> jax.Array:
  """(B, C, H, W) scores of a (B, H, W, 3) batch by `mode` ("whole" | "slide"), resized to
  `out_size` (the original label size, before the keep-ratio test resize) when given.

  "slide" needs `crop` and `stride` (and uses `num_classes` / `batch_size` as
  `slide_inference`); "whole" uses `size_divisor`.
  """
  if mode == "whole":
    scores = whole_inference(score_fn, image, size_divisor=size_divisor)
  elif mode == "slide":
    if crop is None or stride is None:
      raise ValueError("mode='slide' needs crop and stride")
    scores = slide_inference(score_fn, image, crop, stride, num_classes=num_classes,
                             batch_size=batch_size)
  else:
    raise ValueError(f"unknown inference mode {mode!r}; expected 'whole' or 'slide'")
  if out_size is not None:
    scores = resize_scores(scores, out_size)
  return scores
