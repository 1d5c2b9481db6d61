"""`files.read_image` on real-world files: every PIL mode to uint8 RGB, 16-bit depth, EXIF
orientation and broken files. Each test writes its own file into tmp_path from a known array."""

import re
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from segvit_jax.data import files

H, W = 5, 7  # not square, so a wrong turn changes the shape


def rgb_array(seed: int = 0) -> np.ndarray:
  """(H, W, 3) uint8 with every value distinct enough to catch any swap or flip."""
  return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def grey16_array(shape=(H, W)) -> np.ndarray:
  """uint16 holding 0, 65535, v * 257 values and values where x >> 8 != round(x / 257)."""
  x = np.random.default_rng(1).integers(0, 65536, shape, dtype=np.uint16)
  flat = x.reshape(-1)
  flat[:6] = [0, 65535, 200, 257 * 77, 257 * 77 + 128, 257 * 77 + 129]
  return x


def expected_8bit(x: np.ndarray) -> np.ndarray:
  """round(x / 257), written independently of the code under test."""
  return np.rint(x.astype(np.float64) / 257.0).astype(np.uint8)


def png_bytes(pixels: np.ndarray, colour_type: int) -> bytes:
  """A 16-bit PNG written by hand (PIL cannot write 16-bit grey + alpha, cv2 cannot write two
  channels); colour_type 4 = grey + alpha."""
  h, w = pixels.shape[:2]
  rows = b"".join(b"\0" + pixels[i].astype(">u2").tobytes() for i in range(h))

  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

  ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows))
          + chunk(b"IEND", b""))


def check_rgb(image: np.ndarray, expected: np.ndarray) -> None:
  assert image.dtype == np.uint8 and image.shape == expected.shape
  np.testing.assert_array_equal(image, expected)


# ----------------------------------------------------------------------------------------------
# 16 bit.


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path):
  x = grey16_array()
  path = str(tmp_path / "grey16.png")
  Image.fromarray(x).save(path)
  with Image.open(path) as img:
    assert img.mode == "I;16"  # what PIL makes of it; convert("RGB") used to clip this to 255
  expected = expected_8bit(x)
  assert expected.reshape(-1)[:6].tolist() == [0, 255, 1, 77, 77, 78]
  check_rgb(files.read_image(path), np.repeat(expected[..., None], 3, -1))


@pytest.mark.parametrize("mode", ["I;16B", "I"])
def test_16bit_grey_tiff_modes(tmp_path, mode):
  x = grey16_array()
  path = str(tmp_path / f"grey16_{mode.replace(';', '')}.tif")
  if mode == "I":
    img = Image.fromarray(x.astype(np.int32))
  else:
    img = Image.frombytes(mode, (W, H), x.astype(">u2").tobytes())
  img.save(path)
  with Image.open(path) as opened:
    assert opened.mode == mode
  check_rgb(files.read_image(path), np.repeat(expected_8bit(x)[..., None], 3, -1))


def test_32bit_integer_out_of_16bit_range_is_refused(tmp_path):
  path = str(tmp_path / "int32.tif")
  Image.fromarray(np.full((H, W), 70000, np.int32)).save(path)
  with pytest.raises(ValueError, match=re.escape(path) + r".*\[70000, 70000\].*\[0, 65535\]"):
    files.read_image(path)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
@pytest.mark.parametrize("alpha", [False, True])
def test_16bit_rgb_is_rounded_not_truncated(tmp_path, suffix, alpha):
  x = np.stack([grey16_array(), grey16_array()[::-1], grey16_array()[:, ::-1]], -1)
  path = str(tmp_path / f"rgb16{'a' if alpha else ''}{suffix}")
  stored = x[..., ::-1]  # cv2 writes BGR
  if alpha:
    stored = np.dstack([stored, np.full((H, W), 1234, np.uint16)])
  assert cv2.imwrite(path, stored)
  with Image.open(path) as img:  # PIL keeps only the high byte: up to 1 level off the rounding
    high_byte = np.asarray(img.convert("RGB"))
  assert np.abs(high_byte.astype(int) - expected_8bit(x)).max() == 1
  check_rgb(files.read_image(path), expected_8bit(x))


def test_16bit_grey_alpha_png(tmp_path):
  x = grey16_array()
  path = tmp_path / "la16.png"
  path.write_bytes(png_bytes(np.dstack([x, 65535 - x]), colour_type=4))
  with Image.open(path) as img:
    assert img.mode == "RGBA"  # what PIL makes of it, from 8 of the 16 bits
  check_rgb(files.read_image(str(path)), np.repeat(expected_8bit(x)[..., None], 3, -1))


# ----------------------------------------------------------------------------------------------
# 8-bit modes.


def test_rgb_and_grey(tmp_path):
  rgb = rgb_array()
  Image.fromarray(rgb).save(tmp_path / "rgb.png")
  check_rgb(files.read_image(str(tmp_path / "rgb.png")), rgb)
  grey = rgb[..., 0]
  Image.fromarray(grey).save(tmp_path / "grey.png")
  check_rgb(files.read_image(str(tmp_path / "grey.png")), np.repeat(grey[..., None], 3, -1))


def test_alpha_is_dropped(tmp_path):
  """RGBA and LA give their colour channels as stored, whatever the alpha (not composited)."""
  rgb = rgb_array()
  alpha = np.random.default_rng(3).integers(0, 256, (H, W), dtype=np.uint8)
  alpha[0, 0] = 0  # fully transparent pixels keep their colour too
  Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "rgba.png")
  check_rgb(files.read_image(str(tmp_path / "rgba.png")), rgb)
  grey = rgb[..., 1]
  Image.fromarray(np.dstack([grey, alpha]), "LA").save(tmp_path / "la.png")
  with Image.open(tmp_path / "la.png") as img:
    assert img.mode == "LA"
  check_rgb(files.read_image(str(tmp_path / "la.png")), np.repeat(grey[..., None], 3, -1))


@pytest.mark.parametrize("transparency", [None, "index", "alpha_per_entry"])
def test_palette_png(tmp_path, transparency):
  palette = np.random.default_rng(4).integers(0, 256, (256, 3), dtype=np.uint8)
  indices = np.random.default_rng(5).integers(0, 256, (H, W), dtype=np.uint8)
  img = Image.fromarray(indices, "P")
  img.putpalette(palette.reshape(-1).tolist())
  path = str(tmp_path / "palette.png")
  if transparency == "index":  # one transparent palette entry (a tRNS chunk with one index)
    img.save(path, transparency=int(indices[0, 0]))
  elif transparency == "alpha_per_entry":  # an alpha for every palette entry
    img.save(path, transparency=bytes(range(256)))
  else:
    img.save(path)
  with Image.open(path) as opened:
    assert opened.mode == "P"
    assert ("transparency" in opened.info) == (transparency is not None)
  check_rgb(files.read_image(path), palette[indices])


def test_palette_with_alpha_mode_pa():
  """PA (palette + alpha) is a PIL mode no file format here writes: the decoded image only."""
  palette = np.random.default_rng(6).integers(0, 256, (256, 3), dtype=np.uint8)
  indices = np.random.default_rng(7).integers(0, 256, (H, W), dtype=np.uint8)
  img = Image.fromarray(indices, "P")
  img.putpalette(palette.reshape(-1).tolist())
  pa = img.convert("PA")
  assert pa.mode == "PA"
  check_rgb(files.pil_to_rgb8(pa), palette[indices])


def test_bilevel(tmp_path):
  bits = np.random.default_rng(8).integers(0, 2, (H, W)).astype(bool)
  path = str(tmp_path / "bits.png")
  Image.fromarray(bits).save(path)
  with Image.open(path) as img:
    assert img.mode == "1"
  check_rgb(files.read_image(path), np.repeat((bits * 255).astype(np.uint8)[..., None], 3, -1))


def test_float_image_in_unit_range(tmp_path):
  x = np.random.default_rng(9).random((H, W)).astype(np.float32)
  x[0, :2] = [0.0, 1.0]
  path = str(tmp_path / "float.tif")
  Image.fromarray(x, "F").save(path)
  with Image.open(path) as img:
    assert img.mode == "F"
  expected = np.rint(x.astype(np.float64) * 255).astype(np.uint8)
  check_rgb(files.read_image(path), np.repeat(expected[..., None], 3, -1))


def test_float_image_outside_unit_range_is_refused(tmp_path):
  path = str(tmp_path / "float255.tif")
  Image.fromarray(np.full((H, W), 200.0, np.float32), "F").save(path)
  with pytest.raises(ValueError, match=re.escape(path) + r".*\[200.0, 200.0\].*\[0, 1\]"):
    files.read_image(path)


def smooth_rgb() -> np.ndarray:
  """A smooth (64, 96, 3) image, so JPEG loses little of it."""
  yy, xx = np.mgrid[0:64, 0:96].astype(np.float64)
  return np.stack([40 + 2 * yy, 30 + 2 * xx, 200 - yy - xx], -1).clip(0, 255).astype(np.uint8)


def test_cmyk_jpeg_within_jpeg_tolerance(tmp_path):
  """PIL's RGB -> CMYK is C = 255 - R (K = 0) and its CMYK -> RGB undoes that, so only JPEG's
  loss remains: on this textured image at quality 95, at most 12 levels and 2.5 on average
  (measured: 8 and 1.51). An inverted (Adobe) CMYK read wrong would be off by ~200."""
  noise = np.random.default_rng(13).integers(-20, 21, (64, 96, 3))
  rgb = (smooth_rgb().astype(int) + noise).clip(0, 255).astype(np.uint8)
  path = str(tmp_path / "cmyk.jpg")
  Image.fromarray(rgb).convert("CMYK").save(path, quality=95)
  with Image.open(path) as img:
    assert img.mode == "CMYK"
  image = files.read_image(path)
  assert image.shape == rgb.shape and image.dtype == np.uint8
  diff = np.abs(image.astype(int) - rgb)
  assert diff.max() <= 12 and diff.mean() <= 2.5


def test_cmyk_tiff_exact(tmp_path):
  rgb = rgb_array(10)
  path = str(tmp_path / "cmyk.tif")
  Image.fromarray(rgb).convert("CMYK").save(path)
  with Image.open(path) as img:
    assert img.mode == "CMYK"
  check_rgb(files.read_image(path), rgb)


def test_ycbcr_is_pils_conversion():
  """YCbCr (a decoded PIL image: JPEG files decode to RGB) goes by PIL's conversion, whose
  8-bit round trip from RGB is off by at most 3 levels here (measured)."""
  rgb = smooth_rgb()
  ycbcr = Image.fromarray(rgb).convert("YCbCr")
  check_rgb(files.pil_to_rgb8(ycbcr), np.asarray(ycbcr.convert("RGB")))
  assert np.abs(files.pil_to_rgb8(ycbcr).astype(int) - rgb).max() <= 3


# ----------------------------------------------------------------------------------------------
# EXIF orientation.

# The PIL transpose that stores an upright image so that orientation o turns it back.
STORE = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,  # the camera turned 90 clockwise: stored turned the other way
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def exif_with_orientation(orientation: int) -> Image.Exif:
  exif = Image.Exif()
  exif[0x0112] = orientation
  return exif


@pytest.mark.parametrize("suffix", [".png", ".tif"])  # an eXIf chunk; TIFF tag 274
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_gives_upright_image(tmp_path, orientation, suffix):
  upright = rgb_array(11)
  stored = Image.fromarray(upright)
  if STORE[orientation] is not None:
    stored = stored.transpose(STORE[orientation])
  path = str(tmp_path / f"o{orientation}{suffix}")
  stored.save(path, exif=exif_with_orientation(orientation))
  with Image.open(path) as img:
    assert img.getexif().get(0x0112) == orientation
  check_rgb(files.read_image(path), upright)
  with Image.open(path) as img:  # the same as PIL's own turn
    check_rgb(files.read_image(path), np.asarray(ImageOps.exif_transpose(img)))


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_jpeg_as_pil(tmp_path, orientation):
  """A phone photo: a JPEG turned by its EXIF tag; exact against PIL's own decode and turn."""
  path = str(tmp_path / "phone.jpg")
  Image.fromarray(smooth_rgb()).save(path, quality=90, exif=exif_with_orientation(orientation))
  image = files.read_image(path)
  assert image.shape == (96, 64, 3)
  with Image.open(path) as img:
    check_rgb(image, np.asarray(ImageOps.exif_transpose(img).convert("RGB")))


def test_exif_orientation_of_16bit_rgb(tmp_path):
  """The cv2 path (16-bit colour) is turned once, as the PIL path."""
  x = np.stack([grey16_array()] * 3, -1)
  x[..., 1] = 65535 - x[..., 1]
  path = str(tmp_path / "rgb16_o6.png")
  # Stored turned 90 counter-clockwise; orientation 6 turns it back. PIL cannot write 16-bit RGB,
  # so cv2 writes the pixels and an eXIf chunk is spliced in before IEND.
  assert cv2.imwrite(path, np.ascontiguousarray(np.rot90(x, 1)[..., ::-1]))
  data = (tmp_path / "rgb16_o6.png").read_bytes()
  exif = exif_with_orientation(6).tobytes()
  chunk = struct.pack(">I", len(exif)) + b"eXIf" + exif + struct.pack(
      ">I", zlib.crc32(b"eXIf" + exif) & 0xFFFFFFFF)
  iend = data.rindex(b"IEND") - 4
  (tmp_path / "rgb16_o6.png").write_bytes(data[:iend] + chunk + data[iend:])
  with Image.open(path) as img:
    assert img.getexif()[0x0112] == 6
  check_rgb(files.read_image(path), expected_8bit(x))


def test_apply_orientation_matches_exif_transpose():
  upright = rgb_array(12)
  for orientation in range(1, 9):
    img = Image.fromarray(upright)
    img.getexif()[0x0112] = orientation
    np.testing.assert_array_equal(files.apply_orientation(upright, orientation),
                                  np.asarray(ImageOps.exif_transpose(img)))


# ----------------------------------------------------------------------------------------------
# Broken files.


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_names_the_path(tmp_path, fmt):
  path = tmp_path / f"cut.{fmt.lower()}"
  Image.fromarray(smooth_rgb()).save(path, fmt)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match=r"cannot decode image " + re.escape(str(path))):
    files.read_image(str(path))


def test_not_an_image(tmp_path):
  path = tmp_path / "notes.jpg"
  path.write_text("this is not a picture\n")
  with pytest.raises(ValueError, match=r"cannot decode image " + re.escape(str(path))):
    files.read_image(str(path))
