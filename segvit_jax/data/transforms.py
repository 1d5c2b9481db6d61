"""SegViT / mmseg and EoMT train augmentations, and the test transforms.

SegViT (SegViT Sec. 4.2, "Training settings."; the release's mmseg configs) uses mmseg's train
pipeline: keep-ratio resize to a base scale times a random ratio, random crop with
`cat_max_ratio`, horizontal flip, photometric distortion, normalise, pad (image 0, label 255).

EoMT (EoMT App. A.2, "Augmentation.") uses the Mask2Former/EoMT large-scale jitter:
colour jitter (torchvision ColorJitter-style factors, as EoMT's `Transforms.color_jitter`),
horizontal flip, scale jitter (keep-ratio resize to factor * crop / long side, torchvision
`ScaleJitter`), pad to the crop (image 0, label ignore), random crop to the crop. Panoptic
training (COCO panoptic) runs the same steps on a segment-index map (`segment_map`,
`PanopticAugment`: vanished segments invalid, redrawn when none is left).

Test: the image resized by the protocol's policy at every multi-scale ratio
(`MultiScaleResize`); the label stays at full resolution and normalisation happens on the
device.

Each step is a small pure numpy function on arrays; grain transform classes below wrap them for
records `dict(image=(H, W, 3), label=(H, W), ...)`. The random ones are `grain.transforms.
RandomMap`s and take every random number from the `np.random.Generator` grain passes in, so the
pipeline is seeded and deterministic. Images stay uint8 until `Normalize`, as in mmseg.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import grain
import numpy as np
from absl import logging
from PIL import Image

# ----------------------------------------------------------------------------------------------
# Resize.


def rescale_size(height: int, width: int, scale: Sequence[int]) -> tuple[int, int]:
  """Keep-ratio target size (h, w) for a (long, short) scale, as mmcv `imrescale`.

  The factor is min(long / long_side, short / short_side): the image grows or shrinks until its
  long side reaches `max(scale)` or its short side reaches `min(scale)`, whichever comes first.
  """
  long_edge, short_edge = max(scale), min(scale)
  factor = min(long_edge / max(height, width), short_edge / min(height, width))
  return max(int(height * factor + 0.5), 1), max(int(width * factor + 0.5), 1)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bilinear resize of a uint8 (H, W, 3) image to size (h, w) with PIL."""
  h, w = size
  if image.shape[:2] == (h, w):
    return image
  return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Nearest-neighbour resize of an (H, W) label map to size (h, w); any dtype.

  Each output pixel takes the input pixel under its centre. An (H, W, L) stack of label maps
  (layered segment maps, `segment_map`) resizes layer by layer.
  """
  h, w = size
  in_h, in_w = label.shape[:2]
  if (in_h, in_w) == (h, w):
    return label
  rows = np.minimum(((np.arange(h) + 0.5) * (in_h / h)).astype(np.int64), in_h - 1)
  cols = np.minimum(((np.arange(w) + 0.5) * (in_w / w)).astype(np.int64), in_w - 1)
  return label[rows[:, None], cols[None, :]]


def random_resize(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                  scale: Sequence[int], ratio_range: Sequence[float]):
  """mmseg `Resize(img_scale=scale, ratio_range=ratio_range, keep_ratio=True)`.

  The base (long, short) scale is multiplied by a ratio uniform in `ratio_range`, then the image
  is rescaled keeping its aspect ratio; image bilinear, label nearest.
  """
  ratio = rng.uniform(ratio_range[0], ratio_range[1])
  target = (int(scale[0] * ratio), int(scale[1] * ratio))
  size = rescale_size(*image.shape[:2], target)
  return resize_image(image, size), resize_label(label, size)


# ----------------------------------------------------------------------------------------------
# Crop, flip, pad.


def crop_box(shape: tuple[int, int], crop_size: Sequence[int],
             rng: np.random.Generator) -> tuple[int, int, int, int]:
  """A random (y0, y1, x0, x1) window of crop_size (h, w), clipped to the image."""
  margin_h = max(shape[0] - crop_size[0], 0)
  margin_w = max(shape[1] - crop_size[1], 0)
  y0 = int(rng.integers(0, margin_h + 1))
  x0 = int(rng.integers(0, margin_w + 1))
  return y0, y0 + crop_size[0], x0, x0 + crop_size[1]


def crop_is_diverse(label: np.ndarray, cat_max_ratio: float, ignore_index: int) -> bool:
  """mmseg's test: > 1 class present and the largest covers < cat_max_ratio (ignore excluded)."""
  classes, counts = np.unique(label, return_counts=True)
  counts = counts[classes != ignore_index]
  return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


def random_crop(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                crop_size: Sequence[int], cat_max_ratio: float, ignore_index: int,
                max_tries: int = 10):
  """mmseg `RandomCrop(crop_size, cat_max_ratio)` (1.0: any window).

  A window is drawn up to `max_tries` times (mmseg's fixed 10) until `crop_is_diverse`; if none
  passes, the window
  drawn after the last try is used as is. An image smaller than the crop gives a smaller crop
  (`pad` fills it up later).
  """
  y0, y1, x0, x1 = crop_box(label.shape, crop_size, rng)
  if cat_max_ratio < 1.0:
    for _ in range(max_tries):
      if crop_is_diverse(label[y0:y1, x0:x1], cat_max_ratio, ignore_index):
        break
      y0, y1, x0, x1 = crop_box(label.shape, crop_size, rng)
  return image[y0:y1, x0:x1], label[y0:y1, x0:x1]


def hflip(image: np.ndarray, label: np.ndarray):
  """Mirror image and label left-right."""
  return image[:, ::-1], label[:, ::-1]


def random_flip(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, prob: float):
  """mmseg `RandomFlip(prob)`: horizontal flip with probability `prob`."""
  if rng.random() < prob:
    return hflip(image, label)
  return image, label


def pad(image: np.ndarray, label: np.ndarray, size: Sequence[int], pad_value: float,
        label_pad_value: int):
  """mmseg `Pad(size, pad_val, seg_pad_val)`: pad bottom/right up to size (h, w). `label` is
  (H, W) or an (H, W, L) stack of label maps."""
  h, w = label.shape[:2]
  ph, pw = max(size[0] - h, 0), max(size[1] - w, 0)
  if ph == 0 and pw == 0:
    return image, label
  image = np.pad(image, ((0, ph), (0, pw), (0, 0)), constant_values=pad_value)
  label = np.pad(label, ((0, ph), (0, pw)) + ((0, 0),) * (label.ndim - 2),
                 constant_values=label_pad_value)
  return image, label


# ----------------------------------------------------------------------------------------------
# Photometric distortion.


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
  """RGB in [0, 255] -> HSV in OpenCV's 8-bit ranges: H in [0, 180), S and V in [0, 255].

  Float in, float out (no 8-bit rounding of the intermediate HSV values).
  """
  rgb = rgb.astype(np.float32)
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  v = rgb.max(-1)
  delta = v - rgb.min(-1)
  safe_delta = np.where(delta > 0, delta, 1.0)
  s = np.where(v > 0, delta / np.where(v > 0, v, 1.0), 0.0) * 255.0
  h = np.where(v == r, (g - b) / safe_delta,
               np.where(v == g, 2.0 + (b - r) / safe_delta, 4.0 + (r - g) / safe_delta))
  h = np.where(delta > 0, np.mod(h * 30.0, 180.0), 0.0)  # 60 degrees per sector, halved
  return np.stack([h, s, v], -1).astype(np.float32)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
  """Inverse of `rgb_to_hsv`: H in [0, 180), S, V in [0, 255] -> float RGB in [0, 255]."""
  h, s, v = hsv[..., 0] / 30.0, hsv[..., 1] / 255.0, hsv[..., 2]
  channels = []
  for n in (5.0, 3.0, 1.0):  # R, G, B
    k = np.mod(n + h, 6.0)
    channels.append(v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0))
  return np.stack(channels, -1).astype(np.float32)


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
  """mmseg `PhotoMetricDistortion.convert`: x * alpha + beta, clipped to [0, 255], as uint8."""
  return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def _planes(image: np.ndarray):
  """float32 R, G, B planes, V = max and chroma = max - min (= V * S). Planar arrays: numpy
  reductions over a trailing axis of 3 are far slower than elementwise max / min
  (BENCHMARKS.md, "Data pipeline")."""
  r, g, b = np.moveaxis(np.asarray(image, np.float32), -1, 0)
  v = np.maximum(np.maximum(r, g), b)
  return r, g, b, v, v - np.minimum(np.minimum(r, g), b)


def _to_uint8(channels) -> np.ndarray:
  return np.clip(np.rint(np.stack(channels, -1)), 0, 255).astype(np.uint8)


def adjust_saturation_hsv(image: np.ndarray, alpha: float) -> np.ndarray:
  """uint8 RGB with S scaled by alpha (clipped to 255) at the same H and V: the HSV round trip
  of `rgb_to_hsv` / `hsv_to_rgb` in closed form. With H, V fixed every channel is
  v - v*s*f(h), so scaling s by k maps a channel c to v - (v - c) * k, with
  k = min(alpha, 255 / S) = min(alpha, v / (max - min))."""
  r, g, b, v, chroma = _planes(image)
  k = np.minimum(np.float32(alpha), v / np.where(chroma > 0, chroma, 1.0))
  return _to_uint8([v - (v - c) * k for c in (r, g, b)])


def shift_hue_hsv(image: np.ndarray, delta: float) -> np.ndarray:
  """uint8 RGB with H (OpenCV units, [0, 180)) shifted by delta in [-180, 180] at the same S
  and V: the HSV round trip written for H alone (V and V * S = max - min stay; the position
  within the six 60-degree sectors moves)."""
  r, g, b, v, chroma = _planes(image)
  safe = np.where(chroma > 0, chroma, 1.0)
  h6 = np.where(v == r, (g - b) / safe, np.where(v == g, 2.0 + (b - r) / safe,
                                                 4.0 + (r - g) / safe))  # in [-1, 5)
  h6 = h6 + np.float32(delta / 30.0)  # in [-7, 11): bring to [0, 6) without np.mod (slow)
  h6 = h6 + 6.0 * (h6 < 0) - 6.0 * (h6 >= 6)
  channels = []
  for n in (5.0, 3.0, 1.0):  # R, G, B as in `hsv_to_rgb`
    k = n + h6
    k = k - 6.0 * (k >= 6)
    channels.append(v - chroma * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0))
  return _to_uint8(channels)


def photometric_distortion(image: np.ndarray, rng: np.random.Generator,
                           brightness_delta: float, contrast_range: Sequence[float],
                           saturation_range: Sequence[float], hue_delta: int) -> np.ndarray:
  """mmseg `PhotoMetricDistortion` on a uint8 RGB image; returns uint8.

  In order: brightness (+-delta, p 0.5); contrast (factor in range, p 0.5) either here or last
  (mode chosen with p 0.5); saturation (factor in range on S, p 0.5); hue (integer delta in
  [-hue_delta, hue_delta) on H in [0, 180), p 0.5); contrast if not done before. Each step clips
  to [0, 255] and goes back to uint8 like mmseg. The factors are the config's
  (`config.augment.photometric_*`: mmseg's defaults 32, (0.5, 1.5), (0.5, 1.5), 18 in the
  configs).
  """
  image = np.asarray(image, np.uint8)
  if rng.integers(2):
    image = _convert(image, beta=rng.uniform(-brightness_delta, brightness_delta))
  contrast_first = bool(rng.integers(2))

  def contrast(img):
    if rng.integers(2):
      return _convert(img, alpha=rng.uniform(*contrast_range))
    return img

  if contrast_first:
    image = contrast(image)
  if rng.integers(2):
    image = adjust_saturation_hsv(image, rng.uniform(*saturation_range))
  if rng.integers(2):
    image = shift_hue_hsv(image, int(rng.integers(-hue_delta, hue_delta)))
  if not contrast_first:
    image = contrast(image)
  return image


# ----------------------------------------------------------------------------------------------
# EoMT: scale jitter and colour jitter (EoMT App. A.2, "Augmentation.").


def scale_jitter_size(height: int, width: int, target_size: Sequence[int],
                      factor: float) -> tuple[int, int]:
  """torchvision `ScaleJitter` output size (h, w) for a jitter factor, keeping the aspect ratio.

  The image is scaled by factor * min(target_h / height, target_w / width), i.e. for a square
  target by factor * crop / max(height, width) (Mask2Former / EoMT large-scale jitter); sizes are
  truncated like torchvision's `int(...)`. (torchvision pairs target_size[1] with the height and
  [0] with the width; with the square crops EoMT uses both pairings agree.)
  """
  r = factor * min(target_size[0] / height, target_size[1] / width)
  return max(int(height * r), 1), max(int(width * r), 1)


def scale_jitter(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                 target_size: Sequence[int], scale_range: Sequence[float]):
  """EoMT's `ScaleJitter(target_size, scale_range)`: factor uniform in `scale_range`, then the
  keep-ratio resize of `scale_jitter_size`; image bilinear, label nearest (values preserved)."""
  factor = rng.uniform(scale_range[0], scale_range[1])
  size = scale_jitter_size(*image.shape[:2], target_size, factor)
  return resize_image(image, size), resize_label(label, size)


def _blend(image: np.ndarray, other, factor: float) -> np.ndarray:
  """torchvision `_blend` on uint8: image * f + other * (1 - f), clipped to [0, 255], truncated."""
  out = image.astype(np.float32) * factor + np.asarray(other, np.float32) * (1.0 - factor)
  return np.clip(out, 0, 255).astype(np.uint8)


def grayscale(image: np.ndarray) -> np.ndarray:
  """torchvision `rgb_to_grayscale` of a uint8 image as float (H, W, 1): 0.2989 R + 0.587 G +
  0.114 B, floored like torchvision does for integer images."""
  weights = np.array([0.2989, 0.587, 0.114], np.float32)
  return np.floor(image.astype(np.float32) @ weights)[..., None]


def adjust_brightness(image: np.ndarray, factor: float) -> np.ndarray:
  """torchvision `adjust_brightness`: blend with black (image * factor)."""
  return _blend(image, 0.0, factor)


def adjust_contrast(image: np.ndarray, factor: float) -> np.ndarray:
  """torchvision `adjust_contrast`: blend with the mean grey level of the whole image."""
  return _blend(image, grayscale(image).mean(), factor)


def adjust_saturation(image: np.ndarray, factor: float) -> np.ndarray:
  """torchvision `adjust_saturation`: blend with the image's own greyscale version."""
  return _blend(image, grayscale(image), factor)


def adjust_hue(image: np.ndarray, hue: float) -> np.ndarray:
  """torchvision `adjust_hue`: rotate the hue by `hue` turns (in [-0.5, 0.5]); uint8 out."""
  if hue == 0:
    return np.asarray(image, np.uint8)
  return shift_hue_hsv(image, hue * 180.0)


def color_jitter(image: np.ndarray, rng: np.random.Generator, brightness: float,
                 contrast: float, saturation: float, hue: float) -> np.ndarray:
  """EoMT `Transforms.color_jitter` on a uint8 RGB image; returns uint8.

  Brightness factor uniform in [1 - brightness, 1 + brightness] (p 0.5); then, in an order
  chosen with p 0.5, contrast (factor in [1 - contrast, 1 + contrast], p 0.5) before or after
  saturation (factor in [1 - saturation, 1 + saturation], p 0.5) and hue (shift uniform in
  [-hue, hue] turns, p 0.5). The factors are the config's (`config.augment.jitter_*`); the
  EoMT configs take EoMT's: its `max_brightness_delta` 32 and `max_hue_delta` 18 (mmseg's
  numbers) as 32 / 255 and 18 / 360 of torchvision factors, contrast and saturation 0.5.
  """
  image = np.asarray(image, np.uint8)
  if rng.random() < 0.5:
    image = adjust_brightness(image, rng.uniform(1.0 - brightness, 1.0 + brightness))

  def contrast_op(img):
    if rng.random() < 0.5:
      img = adjust_contrast(img, rng.uniform(1.0 - contrast, 1.0 + contrast))
    return img

  def saturation_and_hue(img):
    if rng.random() < 0.5:
      img = adjust_saturation(img, rng.uniform(1.0 - saturation, 1.0 + saturation))
    if rng.random() < 0.5:
      img = adjust_hue(img, rng.uniform(-hue, hue))
    return img

  if rng.random() < 0.5:
    return saturation_and_hue(contrast_op(image))
  return contrast_op(saturation_and_hue(image))


# ----------------------------------------------------------------------------------------------
# Normalise.


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """(image - mean) / std per channel, float32."""
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  return (image.astype(np.float32) - mean) / std


# ----------------------------------------------------------------------------------------------
# grain transforms on records dict(image=(H, W, 3), label=(H, W), ...). They return new dicts
# and never modify the record they are given.


def _replace(record: dict, **fields) -> dict:
  out = dict(record)
  out.update(fields)
  return out


@dataclasses.dataclass(frozen=True)
class RandomResize(grain.transforms.RandomMap):
  """`random_resize` on a record."""
  scale: tuple[int, int]
  ratio_range: tuple[float, float]

  def random_map(self, record: dict, rng: np.random.Generator) -> dict:
    image, label = random_resize(record["image"], record["label"], rng, self.scale,
                                 self.ratio_range)
    return _replace(record, image=image, label=label)


@dataclasses.dataclass(frozen=True)
class RandomCrop(grain.transforms.RandomMap):
  """`random_crop` on a record."""
  crop_size: tuple[int, int]
  cat_max_ratio: float
  ignore_index: int

  def random_map(self, record: dict, rng: np.random.Generator) -> dict:
    image, label = random_crop(record["image"], record["label"], rng, self.crop_size,
                               self.cat_max_ratio, self.ignore_index)
    return _replace(record, image=image, label=label)


@dataclasses.dataclass(frozen=True)
class RandomFlip(grain.transforms.RandomMap):
  """`random_flip` on a record."""
  prob: float

  def random_map(self, record: dict, rng: np.random.Generator) -> dict:
    image, label = random_flip(record["image"], record["label"], rng, self.prob)
    return _replace(record, image=image, label=label)


@dataclasses.dataclass(frozen=True)
class PhotoMetricDistortion(grain.transforms.RandomMap):
  """`photometric_distortion` on a record's image."""
  brightness_delta: float
  contrast_range: tuple[float, float]
  saturation_range: tuple[float, float]
  hue_delta: int

  def random_map(self, record: dict, rng: np.random.Generator) -> dict:
    image = photometric_distortion(record["image"], rng, self.brightness_delta,
                                   self.contrast_range, self.saturation_range, self.hue_delta)
    return _replace(record, image=image)


@dataclasses.dataclass(frozen=True)
class ScaleJitter(grain.transforms.RandomMap):
  """`scale_jitter` on a record (EoMT large-scale jitter of the target size)."""
  target_size: tuple[int, int]
  scale_range: tuple[float, float]

  def random_map(self, record: dict, rng: np.random.Generator) -> dict:
    image, label = scale_jitter(record["image"], record["label"], rng, self.target_size,
                                self.scale_range)
    return _replace(record, image=image, label=label)


@dataclasses.dataclass(frozen=True)
class ColorJitter(grain.transforms.RandomMap):
  """`color_jitter` on a record's image (EoMT's torchvision-style colour jitter)."""
  brightness: float
  contrast: float
  saturation: float
  hue: float

  def random_map(self, record: dict, rng: np.random.Generator) -> dict:
    image = color_jitter(record["image"], rng, self.brightness, self.contrast, self.saturation,
                         self.hue)
    return _replace(record, image=image)


@dataclasses.dataclass(frozen=True)
class Normalize(grain.transforms.Map):
  """`normalize` on a record's image (float32 out)."""
  mean: tuple[float, ...]
  std: tuple[float, ...]

  def map(self, record: dict) -> dict:
    return _replace(record, image=normalize(record["image"], self.mean, self.std))


@dataclasses.dataclass(frozen=True)
class Pad(grain.transforms.Map):
  """`pad` on a record: image with `pad_value`, label with `label_pad_value`, to size (h, w)."""
  size: tuple[int, int]
  pad_value: float
  label_pad_value: int

  def map(self, record: dict) -> dict:
    image, label = pad(record["image"], record["label"], self.size, self.pad_value,
                       self.label_pad_value)
    return _replace(record, image=image, label=label)


# ----------------------------------------------------------------------------------------------
# Panoptic training targets (EoMT App. A.2, "Loss function."; COCO panoptic). A training
# example carries its segments as a segment-index map, never as a (N, H, W) mask stack: `label`
# (H, W) int32 holds k on the pixels of segment k and `ignore_index` on void / crowd / padding
# pixels; `segment_classes` (max_segments,) int32 holds segment k's contiguous class id, -1 for
# padding and for segments the augmentation cropped or scaled away. The same geometric
# transforms as for a semantic label map apply (nearest resizing keeps the indices).
#
# Instances that overlap (COCO instances) need more than one map: with `mask_layers` L > 1,
# `label` is (H, W, L), L segment-index maps, and segment k's mask is the union over layers of
# `label[..., l] == k`. Each segment goes, in order, into the first layer where it overlaps no
# earlier segment, so the masks come back exactly while L suffices; a segment that overlaps
# something in every layer goes into the layer where it overlaps fewest pixels and takes them
# (what the single map, L = 1, does with every overlap). Host cost: 4 L bytes per pixel, e.g.
# 1.6 L MB per 640 x 640 crop, against 41 MB for a (100, 640, 640) bool mask stack.


_LAYERS_WARNED: list[str] = []  # the first example whose masks did not fit the layers


def segment_map(masks: np.ndarray, class_ids: np.ndarray, max_segments: int,
                ignore_index: int, name: str = "", mask_layers: int = 1
                ) -> tuple[np.ndarray, np.ndarray]:
  """Segment masks (N, H, W) bool and their classes (N,) -> (label (H, W) int32, or (H, W, L)
  for `mask_layers` L > 1, segment_classes (max_segments,) int32) as described above, segment
  k = masks[k]. ValueError naming the example `name` if N > max_segments, or if `ignore_index`
  could be a segment index."""
  if 0 <= ignore_index < max_segments:
    raise ValueError(f"ignore_index {ignore_index} is a valid segment index with "
                     f"max_segments={max_segments}: segment indices are 0..{max_segments - 1}")
  n = len(class_ids)
  if n > max_segments:
    raise ValueError(f"{name or 'an example'} has {n} segments (crowd dropped), more than "
                     f"config.dataset.max_segments={max_segments}; raise it")
  if mask_layers < 1:
    raise ValueError(f"config.dataset.mask_layers={mask_layers} must be at least 1")
  if mask_layers == 1:
    label = np.full(masks.shape[1:], ignore_index, np.int32)
    for k, mask in enumerate(masks):
      label[mask] = k
  else:
    label = np.full((*masks.shape[1:], mask_layers), ignore_index, np.int32)
    for k, mask in enumerate(masks):
      rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
      if not len(rows):
        continue
      # Within the mask's bounding box (a view): most masks are small against the image.
      box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
      window, mask = label[box], mask[box]
      overlaps = np.count_nonzero(window[mask] != ignore_index, axis=0)  # (L,)
      layer = int(np.argmin(overlaps))  # the first layer of fewest (0 if any) overlaps
      if overlaps[layer] and not _LAYERS_WARNED:
        _LAYERS_WARNED.append(name)
        logging.warning("%s: instance %d overlaps others in all %d mask layers; it takes %d "
                        "of their pixels (raise config.dataset.mask_layers to keep every "
                        "overlap; logged once per process)", name or "an example", k,
                        mask_layers, int(overlaps[layer]))
      window[mask, layer] = k
  classes = np.full((max_segments,), -1, np.int32)
  classes[:n] = class_ids
  return label, classes


def segments_present(label: np.ndarray, num_segments: int) -> np.ndarray:
  """(num_segments,) bool: segment k has a pixel in the segment-index map `label` (any
  layer of a layered one)."""
  flat = label.ravel()
  flat = flat[(flat >= 0) & (flat < num_segments)]
  return np.bincount(flat, minlength=num_segments)[:num_segments] > 0


def drop_vanished_segments(label: np.ndarray, segment_classes: np.ndarray) -> np.ndarray:
  """`segment_classes` with -1 for the segments that have no pixel left in `label`."""
  present = segments_present(label, len(segment_classes))
  return np.where(present, segment_classes, -1).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class PanopticTargets(grain.transforms.Map):
  """A panoptic record (image, masks (N, H, W), class_ids (N,), name, optionally is_crowd (N,))
  -> dict(image, label = the segment-index map, segment_classes, name) by `segment_map`.
  Segments flagged `is_crowd` (a source read with drop_crowd=False) are no segments: their
  pixels are ignored, as EoMT's training transforms drop crowd targets. `mask_layers` > 1:
  the layered map of overlapping masks."""
  max_segments: int
  ignore_index: int
  mask_layers: int = 1

  def map(self, record: dict) -> dict:
    name = record.get("name", "")
    masks, class_ids = record["masks"], record["class_ids"]
    if "is_crowd" in record:
      keep = ~np.asarray(record["is_crowd"], bool)
      masks, class_ids = masks[keep], np.asarray(class_ids)[keep]
    label, classes = segment_map(masks, class_ids, self.max_segments, self.ignore_index, name,
                                 self.mask_layers)
    return {"image": record["image"], "label": label, "segment_classes": classes,
            "name": name}


@dataclasses.dataclass(frozen=True)
class PanopticAugment(grain.transforms.RandomMap):
  """The geometric augmentation `ops` (grain Maps / RandomMaps on records) on a panoptic record,
  then the segments with no pixel left marked invalid (`drop_vanished_segments`). As in EoMT's
  `Transforms`, which keep only non-empty masks and redo the augmentation from the original
  image when none is left: `ops` are redrawn up to `max_tries` times until a segment is left
  (the last draw is kept otherwise; an example without segments is augmented once)."""
  ops: tuple
  max_tries: int = 10

  def random_map(self, record: dict, rng: np.random.Generator) -> dict:
    tries = self.max_tries if (record["segment_classes"] >= 0).any() else 1
    for _ in range(tries):
      out = record
      for op in self.ops:
        out = (op.random_map(out, rng) if isinstance(op, grain.transforms.RandomMap)
               else op.map(out))
      classes = drop_vanished_segments(out["label"], out["segment_classes"])
      if (classes >= 0).any():
        break
    return _replace(out, segment_classes=classes)


# ----------------------------------------------------------------------------------------------
# Test-time resize policies (SegViT Sec. 4.2, SegFormer Sec. 4.1, EoMT App. A.3).

TEST_RESIZES = ("keep_ratio", "keep_ratio_aligned", "short_side", "long_side", "none")


def test_size(height: int, width: int, resize: str, scale: Sequence[int], ratio: float,
              size_divisor: int, min_size: int) -> tuple[int, int]:
  """The (h, w) an (height, width) image is resized to at test time, at one multi-scale `ratio`.

  keep_ratio          mmseg `Resize(keep_ratio=True)` in `MultiScaleFlipAug`: the scale
                      (long, short) becomes (int(long * ratio), int(short * ratio)), then the
                      mmcv keep-ratio rule (`rescale_size`). SegViT: scale (2048, crop).
  keep_ratio_aligned  SegFormer's `AlignedResize`: keep_ratio, then both sides rounded UP to a
                      multiple of `size_divisor` (32 in the SegFormer configs).
  short_side          EoMT semantic: factor = max(crop_h / h, crop_w / w) for scale (crop_h,
                      crop_w) times `ratio`, sides round(side * factor) (Python rounding), so the
                      shorter side becomes the crop.
  long_side           EoMT panoptic / instance: factor = min(size_h / h, size_w / w) for scale
                      (size_h, size_w) (the model input) times `ratio`, sides round(side *
                      factor), so the longer side becomes the input size and the image fits in
                      it; the mask predictor (`evaluation.inference.MaskPredictor`) then pads it
                      with black at the bottom / right to the square input.
  none                the image as it is (times `ratio`, int(side * ratio + 0.5)).
  """
  if resize == "keep_ratio" or resize == "keep_ratio_aligned":
    if len(scale) != 2:
      raise ValueError(f"config.eval.scale={tuple(scale)} must be (long, short) for {resize!r}")
    target = (int(scale[0] * ratio), int(scale[1] * ratio))
    if min_size:
      short = max(min(target), int(min_size))
      target = ((short * height / width, short) if height > width else
                (short, short * width / height))
    h, w = rescale_size(height, width, target)
    if resize == "keep_ratio_aligned":
      d = int(size_divisor)
      h, w = -(-h // d) * d, -(-w // d) * d
    return h, w
  if resize in ("short_side", "long_side"):
    if len(scale) != 2:
      what = "crop" if resize == "short_side" else "model input"
      raise ValueError(f"config.eval.scale={tuple(scale)} must be the (h, w) {what} for "
                       f"'{resize}'")
    # short_side: the image covers the (h, w) box; long_side: it fits inside it.
    fit = max if resize == "short_side" else min
    factor = fit(scale[0] * ratio / height, scale[1] * ratio / width)
    return max(round(height * factor), 1), max(round(width * factor), 1)
  if resize == "none":
    return max(int(height * ratio + 0.5), 1), max(int(width * ratio + 0.5), 1)
  raise ValueError(f"unknown test resize {resize!r}; expected one of {TEST_RESIZES}")


def resize_image_cv2(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bilinear resize of a uint8 (H, W, 3) image to (h, w) with OpenCV, as mmcv `imresize`
  (cv2.INTER_LINEAR: no antialiasing, fixed-point weights), bit for bit."""
  import cv2  # pylint: disable=g-import-not-at-top  (only the test resize needs it)
  h, w = size
  if image.shape[:2] == (h, w):
    return image
  return cv2.resize(np.ascontiguousarray(image), (w, h), interpolation=cv2.INTER_LINEAR)


def resize_for_test(image: np.ndarray, resize: str, scale: Sequence[int], ratio: float,
                    size_divisor: int, min_size: int) -> np.ndarray:
  """A uint8 image resized by the test policy `resize` (see `test_size`) with the resampler of
  the implementation it comes from: OpenCV bilinear for mmseg / SegFormer (the aligned resize
  resamples twice, as `AlignedResize` does), PIL bilinear (antialiased) for EoMT."""
  h, w = image.shape[:2]
  if resize in ("short_side", "long_side"):
    return resize_image(image, test_size(h, w, resize, scale, ratio, size_divisor, min_size))
  if resize == "keep_ratio_aligned":
    image = resize_image_cv2(image, test_size(h, w, "keep_ratio", scale, ratio, size_divisor,
                                              min_size))
  return resize_image_cv2(image, test_size(h, w, resize, scale, ratio, size_divisor, min_size))


@dataclasses.dataclass(frozen=True)
class MultiScaleResize(grain.transforms.Map):
  """The evaluation record: `images`, the image resized by the test policy at each multi-scale
  ratio (uint8); `image` (the original, uint8), `label` (int32, full resolution; records
  without one, e.g. panoptic ones, pass without) and `name`; any other entry of the record
  (panoptic ground truth, `segvit_jax.data.pipeline.PanopticTarget`) passes unchanged."""
  resize: str
  scale: tuple[int, ...]
  ratios: tuple[float, ...]
  size_divisor: int
  min_size: int

  @classmethod
  def from_config(cls, ev) -> "MultiScaleResize":
    """The test resize of a `config.eval` section (an empty `scale`: no resize)."""
    return cls(resize=ev.resize if tuple(ev.scale) else "none", scale=tuple(ev.scale),
               ratios=tuple(float(r) for r in ev.scales), size_divisor=int(ev.size_divisor),
               min_size=int(ev.min_size))

  def map(self, record: dict) -> dict:
    images = tuple(resize_for_test(record["image"], self.resize, self.scale, r,
                                   self.size_divisor, self.min_size) for r in self.ratios)
    out = {**record, "images": images}
    if "label" in record:
      out["label"] = np.ascontiguousarray(record["label"], np.int32)
    return out


@dataclasses.dataclass(frozen=True)
class Format(grain.transforms.Map):
  """Final record layout: image float32, label int32, only the fields in `keys`."""
  keys: tuple[str, ...] = ("image", "label")

  def map(self, record: dict) -> dict:
    out = {k: record[k] for k in self.keys}
    if "image" in out:
      out["image"] = np.ascontiguousarray(out["image"], np.float32)
    if "label" in out:
      out["label"] = np.ascontiguousarray(out["label"], np.int32)
    return out
