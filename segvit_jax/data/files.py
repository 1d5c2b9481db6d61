"""Reading (image, label) file pairs: what every file-backed dataset module shares.

Every source yields records `dict(image=uint8 (H, W, 3) RGB, label=uint8 (H, W), name=str)`
whose labels are already in the train-id convention: classes 0..K-1, `ignore_index` (255)
ignored, and has `class_names` (a tuple of str).

Layout problems surface when a source is built (FileNotFoundError naming the missing path and
the expected layout), before any training work. Files are decoded with PIL on access (16-bit
colour with cv2), EXIF orientation applied; an unreadable file or an out-of-range label raises
ValueError naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from PIL import ExifTags, Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


# ----------------------------------------------------------------------------------------------
# Decoding and label conventions.


def read_image(path: str) -> np.ndarray:
  """Decode an image file to uint8 RGB (H, W, 3), upright; ValueError naming the file if it fails.

  Every PIL mode maps to 8-bit RGB by one stated rule:
  - 8-bit modes (RGB, L, LA, P, PA, RGBA, CMYK, YCbCr, 1, ...): PIL's `convert("RGB")`. Grey is
    replicated, a palette is looked up, and alpha (RGBA, LA, PA, a palette's transparency) is
    dropped, not composited: the colour channels as stored are what PIL's `convert("RGB")`,
    torchvision's `read_image(mode=RGB)` and mmcv's `imread` (which mmseg trains on) give, so a
    model sees the pixels it was trained on.
  - 16-bit grey (I;16, I;16B, I;16L, and I holding 0..65535) and 16-bit-per-channel RGB, RGBA
    and LA: round(x / 257), so 65535 -> 255 and an 8-bit value stored as v * 257 comes back as
    v. PIL clips 16-bit grey to 255 in `convert` and keeps only the high byte (x >> 8, up to
    one level below the rounded value) of 16-bit colour, so 16-bit colour is decoded by cv2.
  - F (32-bit float): taken as intensities in [0, 1], round(x * 255); other values (or NaN)
    raise, since no scale would be right for all of them.
  The EXIF orientation (all 8 values, as `PIL.ImageOps.exif_transpose`) is applied, so phone
  photos come out upright. The whole file is decoded here, so a truncated or corrupt file fails
  in this call (unless something set PIL's process-wide `ImageFile.LOAD_TRUNCATED_IMAGES`, which
  makes PIL fill the missing rows instead).
  """
  try:
    with Image.open(path) as img:
      deep_colour = is_16bit_colour(img)  # before load(), which clears img.tile
      img.load()
      orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
      rgb = decode_16bit_colour(path) if deep_colour else pil_to_rgb8(img)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise ValueError(f"cannot decode image {path}: {e}") from e
  return apply_orientation(rgb, orientation)


def scale_16bit(x: np.ndarray) -> np.ndarray:
  """uint8 round(x / 257) of integers in [0, 65535] (no ties: 257 is odd)."""
  return ((x.astype(np.uint32) + 128) // 257).astype(np.uint8)


def is_16bit_colour(img: Image.Image) -> bool:
  """Whether PIL opened a 16-bit-per-channel RGB / RGBA / LA file, which it keeps at 8 bits.

  PIL shows the depth only in the raw mode of the not yet decoded tiles ("RGB;16B" in a PNG,
  "RGB;16N" in a TIFF; a 16-bit grey + alpha PNG opens as RGBA from "LA;16B"); 5-6-5 packed
  modes ("BGR;16") have no byte-order suffix.
  """
  if img.mode not in ("RGB", "RGBA", "LA"):
    return False
  for tile in img.tile:
    raw = tile.args[0] if isinstance(tile.args, tuple) else tile.args
    if isinstance(raw, str) and raw.rpartition(";")[2] in ("16B", "16L", "16N"):
      return True
  return False


def decode_16bit_colour(path: str) -> np.ndarray:
  """uint8 RGB (H, W, 3) of a 16-bit RGB / RGBA / LA file, read at full depth by cv2."""
  import cv2  # pylint: disable=g-import-not-at-top  (only needed for these rare files)
  try:
    data = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)
  except cv2.error as e:
    raise ValueError(str(e)) from e
  if data is None or data.dtype != np.uint16:
    raise ValueError("OpenCV could not decode it as a 16-bit image")
  if data.ndim == 2:
    data = data[..., None]
  if data.shape[-1] <= 2:  # grey (+ alpha)
    rgb = np.repeat(data[..., :1], 3, axis=-1)
  else:  # BGR (+ alpha)
    rgb = data[..., 2::-1]
  return scale_16bit(rgb)


def pil_to_rgb8(img: Image.Image) -> np.ndarray:
  """uint8 RGB (H, W, 3) of a decoded PIL image by the rules in `read_image`."""
  if img.mode == "F":
    x = np.asarray(img, dtype=np.float32)
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if not 0.0 <= lo <= hi <= 1.0:  # also False for NaN
      raise ValueError(f"float (mode F) image has values in [{lo}, {hi}]; expected intensities "
                       "in [0, 1]")
    grey = np.rint(x * 255).astype(np.uint8)
  elif img.mode.startswith("I"):
    x = np.asarray(img)
    lo, hi = (int(x.min()), int(x.max())) if x.size else (0, 0)
    if lo < 0 or hi > 65535:
      raise ValueError(f"integer (mode {img.mode}) image has values in [{lo}, {hi}]; expected "
                       "16-bit intensities in [0, 65535]")
    grey = scale_16bit(x)
  elif img.mode in ("P", "PA"):  # via RGBA: PIL warns on P + transparency -> RGB
    return np.asarray(img.convert("RGBA"), dtype=np.uint8)[..., :3]
  else:
    return np.asarray(img.convert("RGB"), dtype=np.uint8)
  return np.repeat(grey[..., None], 3, axis=-1)


def apply_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
  """The upright (H', W', C) image for an EXIF / TIFF Orientation tag (274) value 1..8 (others:
  as stored), turned as `PIL.ImageOps.exif_transpose` turns it."""
  turned = {
      2: lambda a: a[:, ::-1],  # mirrored left-right
      3: lambda a: a[::-1, ::-1],  # rotated 180
      4: lambda a: a[::-1],  # mirrored top-bottom
      5: lambda a: a.transpose(1, 0, 2),  # transposed
      6: lambda a: np.rot90(a, -1),  # rotated 90 clockwise to be upright
      7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # transversed
      8: lambda a: np.rot90(a, 1),  # rotated 90 counter-clockwise to be upright
  }.get(orientation if isinstance(orientation, int) else 1)
  return image if turned is None else np.ascontiguousarray(turned(image))


def read_label(path: str) -> np.ndarray:
  """Decode a single-channel label PNG to an integer (H, W) array (palette PNGs: the indices)."""
  try:
    with Image.open(path) as img:
      if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
        raise ValueError(f"expected a single-channel (L, P or I) label image, got mode {img.mode}")
      return np.asarray(img)
  except (OSError, ValueError, SyntaxError) as e:
    raise ValueError(f"cannot decode label {path}: {e}") from e


def reduce_zero_label(label: np.ndarray, ignore_index: int = 255) -> np.ndarray:
  """mmseg `reduce_zero_label`: 0 -> ignore, v -> v - 1, ignore stays ignore."""
  label = label.astype(np.int32)
  out = label - 1
  out[label == 0] = ignore_index
  out[label == ignore_index] = ignore_index
  return out


def _values(values: np.ndarray) -> str:
  values = np.unique(values)
  return ", ".join(str(int(v)) for v in values[:10]) + (" ..." if len(values) > 10 else "")


def check_label(label: np.ndarray, num_classes: int, ignore_index: int, path: str,
                raw: np.ndarray | None = None, conversion: str = "") -> np.ndarray:
  """Return the label as uint8 after checking every value is in [0, num_classes) or ignore.

  `raw`: the label as the file stores it, when `label` was converted from it (`conversion`
  says how, e.g. "reduce_zero_label"): the message then shows the file's values, which the
  user can find in the file, and the converted ones beside them."""
  bad = (label < 0) | ((label >= num_classes) & (label != ignore_index))
  if bad.any():
    if raw is None:
      shown = _values(label[bad])
    else:
      shown = f"{_values(raw[bad])} ({_values(label[bad])} after {conversion})"
    raise ValueError(
        f"label {path} has value(s) {shown} outside the valid range 0..{num_classes - 1} "
        f"(ignore_index {ignore_index})")
  return label.astype(np.uint8)


def lookup_table(mapping: Mapping[int, int], ignore_index: int = 255) -> np.ndarray:
  """uint8 table of 256 entries: table[k] = mapping[k], ignore_index for every other k."""
  table = np.full(256, ignore_index, np.uint8)
  for k, v in mapping.items():
    table[k] = v
  return table


# ----------------------------------------------------------------------------------------------
# The source class.


class SegmentationFiles:
  """grain RandomAccessDataSource over (image, label) file pairs.

  Records: dict(image=uint8 (H, W, 3), label=uint8 (H, W), name=file stem). `label_map`
  (raw label, ignore_index) -> train ids runs before `reduce_zero_label` and the range check;
  `hint` is appended to range errors.
  """

  def __init__(self, pairs: Sequence[tuple[str, str]], class_names: Sequence[str],
               reduce_zero_label: bool = False, ignore_index: int = 255, *,
               label_map: Callable[[np.ndarray, int], np.ndarray] | None = None,
               hint: str = ""):
    self.pairs = list(pairs)
    self.class_names = tuple(class_names)
    self.reduce_zero_label = reduce_zero_label
    self.ignore_index = ignore_index
    self.label_map = label_map
    self.hint = hint

  def __len__(self) -> int:
    return len(self.pairs)

  def __getitem__(self, index: int) -> dict:
    image_path, label_path = self.pairs[int(index)]
    image = read_image(image_path)
    label = read_label(label_path)
    if label.shape != image.shape[:2]:
      raise ValueError(f"label {label_path} is {label.shape[1]}x{label.shape[0]} (WxH) but image "
                       f"{image_path} is {image.shape[1]}x{image.shape[0]}")
    raw, steps = label, []
    if self.label_map is not None:
      label, steps = self.label_map(label, self.ignore_index), ["the dataset's label map"]
    if self.reduce_zero_label:
      label, steps = reduce_zero_label(label, self.ignore_index), steps + ["reduce_zero_label"]
    try:
      label = check_label(label, len(self.class_names), self.ignore_index, label_path,
                          raw=raw if steps else None, conversion=" and ".join(steps))
    except ValueError as e:
      if not self.hint:
        raise
      raise ValueError(f"{e}. {self.hint}") from None
    name = os.path.splitext(os.path.basename(image_path))[0]
    return dict(image=image, label=label, name=name)

  def __repr__(self) -> str:
    return f"SegmentationFiles({len(self)} examples, {len(self.class_names)} classes)"


# ----------------------------------------------------------------------------------------------
# Layouts.


def require_dir(path: str, layout: str) -> None:
  """FileNotFoundError naming `path` (and its absolute form) and the expected layout unless
  it is a directory."""
  if not os.path.isdir(path):
    shown = path if os.path.isabs(path) else f"{path} (= {os.path.abspath(path)})"
    raise FileNotFoundError(f"missing directory {shown}; expected layout: {layout}. Point "
                            "--config.dataset.root at the dataset.")


def require_file(path: str, layout: str) -> None:
  """FileNotFoundError naming `path` and the expected layout unless it is a file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"missing file {path}; expected layout: {layout}")


def paired_files(image_dir: str, label_dir: str, layout: str,
                 label_suffix: str = ".png") -> list[tuple[str, str]]:
  """(image, label) paths for every image in image_dir, sorted by name.

  Raises FileNotFoundError if a directory is missing, holds no images, or an image has no label.
  """
  require_dir(image_dir, layout)
  require_dir(label_dir, layout)
  stems = sorted(os.path.splitext(f) for f in os.listdir(image_dir)
                 if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS)
  if not stems:
    raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {image_dir}; "
                            f"expected layout: {layout}")
  pairs, missing = [], []
  for stem, ext in stems:
    label_path = os.path.join(label_dir, stem + label_suffix)
    if os.path.isfile(label_path):
      pairs.append((os.path.join(image_dir, stem + ext), label_path))
    else:
      missing.append(label_path)
  if missing:
    raise FileNotFoundError(f"{len(missing)} image(s) in {image_dir} have no label file, e.g. "
                            f"{missing[0]}; expected layout: {layout}")
  return pairs


def read_list(path: str) -> list[str]:
  """Image names from a list file, one per line (blank lines skipped, a .jpg/.mat/.png
  extension dropped)."""
  with open(path, encoding="utf-8") as f:
    names = [line.strip() for line in f if line.strip()]
  return [n[:-4] if n.lower().endswith((".jpg", ".mat", ".png")) else n for n in names]


def listed_pairs(list_path: str, image_dir: str, image_ext: str, label_dir: str,
                 label_suffix: str, layout: str) -> list[tuple[str, str]]:
  """(image, label) paths for the names in a split list, in list order; FileNotFoundError
  naming the files the list names that do not exist."""
  require_dir(image_dir, layout)
  require_dir(label_dir, layout)
  require_file(list_path, layout)
  names = read_list(list_path)
  if not names:
    raise FileNotFoundError(f"{list_path} names no images; expected layout: {layout}")
  pairs = [(os.path.join(image_dir, n + image_ext), os.path.join(label_dir, n + label_suffix))
           for n in names]
  missing = [p for pair in pairs for p in pair if not os.path.isfile(p)]
  if missing:
    shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
    raise FileNotFoundError(f"{len(missing)} file(s) named in {list_path} do not exist: "
                            f"{shown}; expected layout: {layout}")
  return pairs


# ----------------------------------------------------------------------------------------------
# Reading `config.dataset`.


def dataset_root(dataset_cfg, what: str | None = None) -> str:
  """`config.dataset.root`, user-expanded; FileNotFoundError if empty, saying it should be
  `what` (default: the {dataset name} directory)."""
  root = os.path.expanduser(dataset_cfg.root or "")
  if not root:
    what = what or f"the {dataset_cfg.name} directory"
    raise FileNotFoundError(f"config.dataset.root is empty; set it to {what}")
  return root


def split_name(dataset: str, split: str, known: Mapping[str, str]) -> str:
  """`known[split]` (our split name -> the dataset's); ValueError listing the known names."""
  if split not in known:
    raise ValueError(f"unknown {dataset} split {split!r}; known: {', '.join(known)}")
  return known[split]


def no_reduce_zero_label(dataset_cfg, hint: str) -> None:
  """ValueError if `config.dataset.reduce_zero_label` is set for a dataset whose label 0 is a
  class; `hint` follows the message."""
  if dataset_cfg.reduce_zero_label:
    raise ValueError(f"config.dataset.reduce_zero_label is True but dataset "
                     f"{dataset_cfg.name!r} keeps label 0 as a class{hint}")
