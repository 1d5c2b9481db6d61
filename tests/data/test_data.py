"""Tests for segvit_jax.data: synthetic set, mmseg augmentations, sources and grain pipelines."""

import importlib.util
import os

import numpy as np
import pytest
from PIL import Image

from segvit_jax.data import files
from segvit_jax.data import pipeline
from segvit_jax.data import registry
from segvit_jax.data import synthetic
from segvit_jax.data import transforms as T
from tests import support

_COMMON = os.path.join(support.ROOT, "configs", "common.py")


def _run_config(**dataset):
  spec = importlib.util.spec_from_file_location("configs_common_for_data_tests", _COMMON)
  common = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(common)
  c = common.run_config()
  c.batch_size = 4
  c.dataset.num_train = 40
  c.dataset.num_eval = 10
  c.dataset.image_size = 64
  c.augment.crop_size = (48, 48)
  c.augment.scale = (256, 64)
  c.eval.scale = (256, 32)
  c.dataset.update(dataset)
  return c


# The augmentation factors of the configs (config.augment): mmseg's photometric distortion,
# EoMT's colour jitter.
PHOTOMETRIC = dict(brightness_delta=32, contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5),
                   hue_delta=18)
JITTER = dict(brightness=32 / 255, contrast=0.5, saturation=0.5, hue=18 / 360)


# ----------------------------------------------------------------------------------------------
# Synthetic dataset.


def test_synthetic_is_deterministic_and_splits_differ():
  a = synthetic.SyntheticSegmentation("train", 10, 64)
  b = synthetic.SyntheticSegmentation("train", 10, 64)
  r1, r2 = a[7], b[7]
  np.testing.assert_array_equal(r1["image"], r2["image"])
  np.testing.assert_array_equal(r1["label"], r2["label"])
  assert r1["name"] == "synthetic_train_000007"
  val = synthetic.SyntheticSegmentation("val", 10, 64)[7]
  other_seed = synthetic.SyntheticSegmentation("train", 10, 64, seed=1)[7]
  assert not np.array_equal(r1["image"], val["image"])
  assert not np.array_equal(r1["image"], other_seed["image"])
  assert not np.array_equal(a[0]["image"], a[1]["image"])
  with pytest.raises(IndexError):
    a[10]


def test_synthetic_records_and_all_classes_appear():
  ds = synthetic.SyntheticSegmentation("train", 50, 96)
  assert ds.class_names == synthetic.CLASS_NAMES and len(ds.class_names) == 6
  counts = np.zeros(6, np.int64)
  for i in range(len(ds)):
    r = ds[i]
    assert r["image"].shape == (96, 96, 3) and r["image"].dtype == np.uint8
    assert r["label"].shape == (96, 96) and r["label"].dtype == np.uint8
    assert r["label"].max() <= 5
    counts += np.bincount(r["label"].ravel(), minlength=6)
  fractions = counts / counts.sum()
  assert (fractions > 0.01).all(), fractions
  assert fractions[0] < 0.95


def test_synthetic_colours_are_shared_across_classes():
  # An object's pixels are one palette colour +- TEXTURE_AMPLITUDE (plus small noise) whatever
  # its class: every object class must use most of the palette, so colour cannot tell classes
  # apart.
  base = synthetic.object_palette()
  candidates = np.concatenate([base + synthetic.TEXTURE_AMPLITUDE,
                               base - synthetic.TEXTURE_AMPLITUDE])
  colour_index = np.tile(np.arange(len(base)), 2)
  ds = synthetic.SyntheticSegmentation("train", 60, 64)
  used = np.zeros((6, len(base)), np.int64)
  for i in range(len(ds)):
    r = ds[i]
    for c in range(1, 6):
      pixels = r["image"][r["label"] == c].astype(np.float32)
      if len(pixels):
        nearest = np.linalg.norm(pixels[:, None] - candidates[None], axis=-1).argmin(-1)
        used[c] += np.bincount(colour_index[nearest], minlength=len(base))
  for c in range(1, 6):
    share = used[c] / used[c].sum()
    assert (share > 0.01).sum() >= 8, (synthetic.CLASS_NAMES[c], np.round(share, 3))
    assert share.max() < 0.3, (synthetic.CLASS_NAMES[c], np.round(share, 3))


# ----------------------------------------------------------------------------------------------
# Transforms.


def test_rescale_size_matches_mmcv_imrescale():
  # factor = min(2048 / 500, 512 / 375): the short side hits 512.
  assert T.rescale_size(375, 500, (2048, 512)) == (512, 683)
  # factor = min(2048 / 1000, 512 / 100): the long side hits 2048.
  assert T.rescale_size(100, 1000, (2048, 512)) == (205, 2048)
  assert T.rescale_size(64, 64, (256, 32)) == (32, 32)


def test_random_resize_draws_ratio_and_keeps_labels():
  image = np.zeros((40, 60, 3), np.uint8)
  label = np.arange(40 * 60).reshape(40, 60) % 3
  out_image, out_label = T.random_resize(image, label, np.random.default_rng(3), (200, 50),
                                         (0.5, 2.0))
  ratio = np.random.default_rng(3).uniform(0.5, 2.0)
  expected = T.rescale_size(40, 60, (int(200 * ratio), int(50 * ratio)))
  assert out_image.shape == expected + (3,) and out_label.shape == expected
  assert set(np.unique(out_label)) <= {0, 1, 2}


def test_resize_label_is_nearest():
  label = np.array([[1, 2], [3, 255]], np.uint8)
  np.testing.assert_array_equal(T.resize_label(label, (4, 4)),
                                np.repeat(np.repeat(label, 2, 0), 2, 1))
  np.testing.assert_array_equal(T.resize_label(np.repeat(np.repeat(label, 2, 0), 2, 1), (2, 2)),
                                label)


def test_crop_is_diverse_follows_mmseg():
  assert not T.crop_is_diverse(np.zeros((4, 4)), 0.75, 255)  # one class
  # 3 of 4 non-ignored pixels are class 0: 0.75 is not < 0.75.
  assert not T.crop_is_diverse(np.array([[0, 0, 0, 1, 255, 255]]), 0.75, 255)
  assert T.crop_is_diverse(np.array([[0, 0, 1, 1, 255, 255]]), 0.75, 255)
  # Ignore pixels do not count as a class.
  assert not T.crop_is_diverse(np.array([[0, 255, 255, 255]]), 0.75, 255)


def test_random_crop_retries_until_cat_max_ratio_holds():
  # 10x10 label, class 1 only in column 0; a 10x9 crop starts at x0 = 0 (class 1 is 1/9 of it,
  # diverse) or x0 = 1 (only class 0). Retries pick x0 = 0; without retries both occur.
  label = np.zeros((10, 10), np.uint8)
  label[:, 0] = 1
  image = np.stack([label] * 3, -1)
  with_retry, without = [], []
  for seed in range(30):
    _, crop = T.random_crop(image, label, np.random.default_rng(seed), (10, 9), 0.95, 255)
    with_retry.append(crop.max())
    _, crop = T.random_crop(image, label, np.random.default_rng(seed), (10, 9), 1.0, 255)
    without.append(crop.max())
  assert all(v == 1 for v in with_retry)
  assert 0 in without and 1 in without


def test_random_crop_of_small_image_and_content():
  image = np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3)
  label = np.arange(30, dtype=np.uint8).reshape(5, 6)
  out_image, out_label = T.random_crop(image, label, np.random.default_rng(0), (8, 8), 1.0, 255)
  np.testing.assert_array_equal(out_image, image)
  np.testing.assert_array_equal(out_label, label)
  out_image, out_label = T.random_crop(image, label, np.random.default_rng(0), (2, 3), 1.0, 255)
  y0, x0 = divmod(int(out_label[0, 0]), 6)
  np.testing.assert_array_equal(out_label, label[y0:y0 + 2, x0:x0 + 3])
  np.testing.assert_array_equal(out_image, image[y0:y0 + 2, x0:x0 + 3])


def test_flip():
  image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
  label = np.array([[0, 1, 2], [3, 4, 5]], np.uint8)
  f_image, f_label = T.hflip(image, label)
  np.testing.assert_array_equal(f_label, [[2, 1, 0], [5, 4, 3]])
  np.testing.assert_array_equal(f_image[0, 0], image[0, 2])
  flips = [T.random_flip(image, label, np.random.default_rng(s), 0.5)[1][0, 0] == 2
           for s in range(40)]
  assert 5 < sum(flips) < 35
  assert not any(T.random_flip(image, label, np.random.default_rng(s), 0.0)[1][0, 0] == 2
                 for s in range(10))


def test_pad_values():
  image = np.full((2, 3, 3), 7.0, np.float32)
  label = np.ones((2, 3), np.uint8)
  p_image, p_label = T.pad(image, label, (4, 5), 0, 255)
  assert p_image.shape == (4, 5, 3) and p_label.shape == (4, 5)
  np.testing.assert_array_equal(p_image[:2, :3], image)
  assert (p_image[2:] == 0).all() and (p_image[:, 3:] == 0).all()
  np.testing.assert_array_equal(p_label[:2, :3], label)
  assert (p_label[2:] == 255).all() and (p_label[:, 3:] == 255).all()


def test_normalize_numbers():
  image = np.array([[[0, 127.5, 255]]], np.float32)
  out = T.normalize(image, (127.5, 127.5, 127.5), (127.5, 127.5, 127.5))
  np.testing.assert_allclose(out, [[[-1.0, 0.0, 1.0]]])
  out = T.normalize(np.array([[[10, 20, 30]]], np.uint8), (1, 2, 3), (3, 6, 9))
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, [[[3.0, 3.0, 3.0]]])


def test_hsv_uses_opencv_ranges_and_round_trips():
  rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128], [255, 255, 0]]],
                 np.float32)
  hsv = T.rgb_to_hsv(rgb)
  np.testing.assert_allclose(hsv[0, :, 0], [0, 60, 120, 0, 30])
  np.testing.assert_allclose(hsv[0, :, 1], [255, 255, 255, 0, 255])
  np.testing.assert_allclose(hsv[0, :, 2], [255, 255, 255, 128, 255])
  image = np.random.default_rng(0).integers(0, 256, (16, 16, 3)).astype(np.float32)
  np.testing.assert_allclose(T.hsv_to_rgb(T.rgb_to_hsv(image)), image, atol=1e-3)


def test_photometric_distortion_range_and_determinism():
  image = synthetic.SyntheticSegmentation("train", 1, 64)[0]["image"]
  outs = []
  for seed in range(8):
    a = T.photometric_distortion(image, np.random.default_rng(seed), **PHOTOMETRIC)
    b = T.photometric_distortion(image, np.random.default_rng(seed), **PHOTOMETRIC)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.uint8 and a.shape == image.shape
    outs.append(a)
  assert sum(not np.array_equal(o, image) for o in outs) >= 6
  # Brightness +200 saturates: values stay clipped to [0, 255].
  bright = T.photometric_distortion(image, np.random.default_rng(0),
                                    **{**PHOTOMETRIC, "brightness_delta": 1000})
  assert bright.min() >= 0 and bright.max() <= 255


@pytest.mark.parametrize("resize,ratio,expected", [
    ("keep_ratio", 1.0, (512, 683)),  # short side reaches 512 first: 640 * 512/480 + 0.5
    ("keep_ratio", 0.5, (256, 341)),  # scale (1024, 256)
    ("keep_ratio", 1.75, (896, 1195)),  # scale (3584, 896)
    ("keep_ratio_aligned", 1.0, (512, 704)),  # SegFormer: 683 rounded up to a multiple of 32
    ("keep_ratio_aligned", 0.75, (384, 512)),  # scale (1536, 384): 384 x 512 already aligned
    ("short_side", 1.0, (512, 683)),  # EoMT: factor max(512/480, 512/640), round(682.67)
    ("short_side", 0.5, (256, 341)),  # round(341.33)
    ("none", 1.0, (480, 640)),
    ("none", 0.5, (240, 320)),
])
def test_test_size_policies(resize, ratio, expected):
  assert T.test_size(480, 640, resize, (2048, 512) if "keep" in resize else (512, 512),
                     ratio, 32, 0) == expected


def test_test_size_long_side_bound_and_errors():
  # 100 x 1000 at (2048, 512): the long side hits 2048 first (factor 2.048).
  assert T.test_size(100, 1000, "keep_ratio", (2048, 512), 1.0, 32, 0) == (205, 2048)
  assert T.test_size(1000, 100, "short_side", (512, 512), 1.0, 32, 0) == (5120, 512)
  with pytest.raises(ValueError, match="unknown test resize 'bicubic'"):
    T.test_size(10, 10, "bicubic", (2048, 512), 1.0, 32, 0)
  with pytest.raises(ValueError, match=r"must be \(long, short\)"):
    T.test_size(10, 10, "keep_ratio", (512,), 1.0, 32, 0)
  with pytest.raises(ValueError, match=r"\(h, w\) crop for 'short_side'"):
    T.test_size(10, 10, "short_side", (512,), 1.0, 32, 0)
  with pytest.raises(ValueError, match=r"\(h, w\) model input for 'long_side'"):
    T.test_size(10, 10, "long_side", (512,), 1.0, 32, 0)
  assert T.test_size(1000, 100, "long_side", (640, 640), 1.0, 32, 0) == (640, 64)


@pytest.mark.parametrize("size,scale,min_size,ratio,expected", [
    # PASCAL-Context (520, 520), min_size 480, a 375 x 500 image: the short side becomes
    # max(int(520 * ratio), 480), the long side follows (mmseg 0.x Resize(min_size=...)).
    ((375, 500), (520, 520), 480, 0.5, (480, 640)),
    ((375, 500), (520, 520), 480, 1.0, (520, 693)),  # 520 * 500 / 375 = 693.3
    ((375, 500), (520, 520), 480, 1.75, (910, 1213)),
    ((500, 375), (520, 520), 480, 1.0, (693, 520)),  # portrait: the same with sides swapped
    # COCO-Stuff (2048, 512), min_size 512, 480 x 640: every ratio below 1 gives 512.
    ((480, 640), (2048, 512), 512, 0.5, (512, 683)),
    ((480, 640), (2048, 512), 512, 0.75, (512, 683)),
    ((480, 640), (2048, 512), 512, 1.75, (896, 1195)),
    # A very wide image: no cap at the long side (without min_size it would stop at 2048).
    ((100, 1000), (2048, 512), 512, 1.0, (512, 5120)),
])
def test_keep_ratio_with_min_size_is_mmseg_resize_min_size(size, scale, min_size, ratio,
                                                           expected):
  assert T.test_size(*size, "keep_ratio", scale, ratio, 32, min_size) == expected


def test_keep_ratio_without_min_size_fits_the_scale():
  assert T.test_size(375, 500, "keep_ratio", (520, 520), 1.0, 32, 0) == (390, 520)


def test_test_resize_resamplers():
  """mmseg policies resample with OpenCV's bilinear (no antialiasing: an exact 2x downscale is
  the mean of each 2x2 block), EoMT's with PIL's antialiased bilinear (wider support)."""
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (64, 96, 3)).astype(np.uint8)
  cv = T.resize_for_test(image, "none", (), 0.5, 32, 0)
  block_mean = image.reshape(32, 2, 48, 2, 3).astype(np.float64).mean(axis=(1, 3))
  assert cv.shape == (32, 48, 3) and cv.dtype == np.uint8
  assert np.abs(cv - block_mean).max() <= 0.5 + 1e-9  # fixed-point rounding only
  pil = T.resize_for_test(image, "short_side", (32, 32), 1.0, 32, 0)
  assert pil.shape == (32, 48, 3)
  np.testing.assert_array_equal(pil, T.resize_image(image, (32, 48)))
  assert np.abs(pil.astype(float) - block_mean).max() > 5  # antialiased: not the block mean
  # The aligned resize resamples twice (keep-ratio, then to the multiple of 32), as SegFormer.
  aligned = T.resize_for_test(image, "keep_ratio_aligned", (2048, 40), 1.0, 32, 0)
  once = T.resize_image_cv2(image, (40, 60))
  np.testing.assert_array_equal(aligned, T.resize_image_cv2(once, (64, 64)))


def test_multi_scale_resize_record():
  record = dict(image=np.zeros((30, 40, 3), np.uint8), label=np.zeros((30, 40), np.uint8),
                name="x")
  out = T.MultiScaleResize(resize="keep_ratio", scale=(80, 60), ratios=(0.5, 1.0),
                           size_divisor=32, min_size=0).map(record)
  assert [im.shape for im in out["images"]] == [(30, 40, 3), (60, 80, 3)]
  assert out["image"].shape == (30, 40, 3) and out["label"].shape == (30, 40)
  assert out["label"].dtype == np.int32 and out["name"] == "x"


# ----------------------------------------------------------------------------------------------
# Pipelines.


def test_train_batches_shapes_and_values():
  c = _run_config()
  it = pipeline.make_train_iterator(c, process_index=0, process_count=1)
  batch = next(it)
  assert set(batch) == {"image", "label"}
  assert batch["image"].shape == (4, 48, 48, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (4, 48, 48) and batch["label"].dtype == np.int32
  assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
  assert set(np.unique(batch["label"])) <= set(range(6)) | {255}


def test_train_iterator_is_deterministic_and_resumes_exactly():
  c = _run_config()
  it = pipeline.make_train_iterator(c, 0, 1)
  first = [next(it) for _ in range(3)]
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  fresh = pipeline.make_train_iterator(c, 0, 1)
  np.testing.assert_array_equal(next(fresh)["image"], first[0]["image"])
  resumed = pipeline.make_train_iterator(c, 0, 1)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])


def test_worker_processes_give_the_same_batches_and_resume():
  # mp_prefetch workers need absl flags parsed (grain reads them); batches must not depend
  # on the number of workers, and the state must restore across them.
  c = _run_config(num_workers=2)
  it = pipeline.make_train_iterator(c, 0, 1)
  try:
    first = [next(it) for _ in range(2)]
    state = it.get_state()
    expected = next(it)
  finally:
    it.close()
  in_process = pipeline.make_train_iterator(_run_config(), 0, 1)
  for want in first:
    np.testing.assert_array_equal(next(in_process)["image"], want["image"])
  resumed = pipeline.make_train_iterator(c, 0, 1)
  try:
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["label"], expected["label"])
  finally:
    resumed.close()


def test_train_iterator_shards_across_processes():
  c = _run_config()
  b0 = next(pipeline.make_train_iterator(c, 0, 2))
  b1 = next(pipeline.make_train_iterator(c, 1, 2))
  assert b0["image"].shape[0] == 2 and b1["image"].shape[0] == 2
  assert not np.array_equal(b0["image"], b1["image"])
  c.batch_size = 5
  with pytest.raises(ValueError, match="not divisible"):
    pipeline.make_train_iterator(c, 0, 2)


def test_eval_dataset_records():
  c = _run_config()
  c.eval.max_examples = 3
  ds, names = pipeline.make_eval_dataset(c, process_index=0, process_count=1)
  assert names == synthetic.CLASS_NAMES and len(ds) == 3
  r = ds[1]
  assert r["image"].shape == (64, 64, 3) and r["image"].dtype == np.uint8
  assert [im.shape for im in r["images"]] == [(32, 32, 3)] and r["images"][0].dtype == np.uint8
  assert r["label"].shape == (64, 64) and r["label"].dtype == np.int32
  assert r["name"] == "synthetic_val_000001"
  raw = synthetic.SyntheticSegmentation("val", 10, 64)[1]
  np.testing.assert_array_equal(r["label"], raw["label"])
  shard, _ = pipeline.make_eval_dataset(c, process_index=1, process_count=2)
  assert [x["name"] for x in shard] == ["synthetic_val_000001"]
  c.eval.max_examples = -1
  assert len(pipeline.make_eval_dataset(c, process_index=0, process_count=1)[0]) == 10


# ----------------------------------------------------------------------------------------------
# File sources.


def _write_pair(root, image_dir, label_dir, name, label, image_ext=".jpg"):
  os.makedirs(os.path.join(root, image_dir), exist_ok=True)
  os.makedirs(os.path.join(root, label_dir), exist_ok=True)
  h, w = label.shape
  image = np.random.default_rng(0).integers(0, 256, (h, w, 3)).astype(np.uint8)
  Image.fromarray(image).save(os.path.join(root, image_dir, name + image_ext))
  Image.fromarray(label.astype(np.uint8), mode="L").save(os.path.join(root, label_dir,
                                                                      name + ".png"))
  return image


def test_ade20k_layout_with_reduce_zero_label(tmp_path):
  root = str(tmp_path / "ADEChallengeData2016")
  label = np.array([[0, 1, 2, 150], [5, 0, 150, 1]], np.uint8)
  for split in ("training", "validation"):
    _write_pair(root, f"images/{split}", f"annotations/{split}", f"ADE_{split}_00000001", label)
  c = _run_config(name="ade20k", root=root, reduce_zero_label=True, num_classes=150)
  source = registry.get_source(c.dataset, "val")
  assert len(source) == 1 and len(source.class_names) == 150
  assert source.class_names[:3] == ("wall", "building", "sky")
  r = source[0]
  assert r["name"] == "ADE_validation_00000001"
  assert r["image"].shape == (2, 4, 3) and r["image"].dtype == np.uint8
  np.testing.assert_array_equal(r["label"], [[255, 0, 1, 149], [4, 255, 149, 0]])
  c.dataset.reduce_zero_label = False
  with pytest.raises(ValueError, match="num_classes is 150 but dataset 'ade20k' has 151"):
    registry.get_source(c.dataset, "train")


def test_folder_source(tmp_path):
  root = str(tmp_path / "mydata")
  label = np.array([[0, 1], [2, 255]], np.uint8)
  image = _write_pair(root, "images/train", "annotations/train", "a", label, ".png")
  _write_pair(root, "images/train", "annotations/train", "b", label, ".jpg")
  with open(os.path.join(root, "classes.txt"), "w") as f:
    f.write("sky\nroad\n\ncar\n")
  c = _run_config(name="folder", root=root, num_classes=3)
  source = registry.get_source(c.dataset, "train")
  assert source.class_names == ("sky", "road", "car") and len(source) == 2
  r = source[0]
  assert r["name"] == "a"
  np.testing.assert_array_equal(r["image"], image)  # PNG is lossless
  np.testing.assert_array_equal(r["label"], label)


def test_missing_root_names_the_path(tmp_path):
  missing = str(tmp_path / "nowhere" / "ADEChallengeData2016")
  c = _run_config(name="ade20k", root=missing, reduce_zero_label=True, num_classes=150)
  with pytest.raises(FileNotFoundError, match="nowhere/ADEChallengeData2016") as e:
    registry.get_source(c.dataset, "train")
  assert "images/training" in str(e.value)
  os.makedirs(missing)
  with pytest.raises(FileNotFoundError,
                     match=os.path.join(missing, "images", "training").replace(".", r"\.")):
    registry.get_source(c.dataset, "train")
  c = _run_config(name="folder", root=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="classes.txt"):
    registry.get_source(c.dataset, "train")


def test_unknown_dataset_lists_known_names():
  with pytest.raises(ValueError, match="synthetic, ade20k, folder"):
    registry.get_source(_run_config(name="imagenet").dataset, "train")


def test_corrupt_image_names_the_file(tmp_path):
  root = str(tmp_path / "d")
  _write_pair(root, "images/val", "annotations/val", "good", np.zeros((2, 2)))
  bad = os.path.join(root, "images", "val", "bad.jpg")
  with open(bad, "wb") as f:
    f.write(b"this is not a jpeg")
  Image.fromarray(np.zeros((2, 2), np.uint8)).save(os.path.join(root, "annotations/val/bad.png"))
  with open(os.path.join(root, "classes.txt"), "w") as f:
    f.write("a\nb\n")
  source = registry.get_source(_run_config(name="folder", root=root, num_classes=2).dataset, "val")
  with pytest.raises(ValueError, match="bad.jpg"):
    source[0]  # sorted: "bad" before "good"
  assert source[1]["name"] == "good"


def test_out_of_range_label_names_file_and_value(tmp_path):
  root = str(tmp_path / "d")
  _write_pair(root, "images/train", "annotations/train", "x", np.array([[0, 7], [1, 255]]))
  with open(os.path.join(root, "classes.txt"), "w") as f:
    f.write("a\nb\nc\n")
  source = registry.get_source(_run_config(name="folder", root=root, num_classes=3).dataset,
                              "train")
  with pytest.raises(ValueError, match=r"x\.png has value\(s\) 7 outside the valid range 0\.\.2"):
    source[0]


# ----------------------------------------------------------------------------------------------
# Bad examples during training (config.dataset.skip_bad_examples).


def _folder_with_a_corrupt_jpeg(root, n=12, size=24):
  """n examples (one a corrupt JPEG) of size x size pixels, 3 classes; returns the bad path."""
  rng = np.random.default_rng(1)
  for i in range(n):
    _write_pair(root, "images/train", "annotations/train", f"ex{i:02d}",
                rng.integers(0, 3, (size, size)))
  bad = os.path.join(root, "images", "train", "ex05.jpg")
  with open(bad, "wb") as f:
    f.write(b"\xff\xd8\xff\xe0 not really a jpeg")
  with open(os.path.join(root, "classes.txt"), "w") as f:
    f.write("a\nb\nc\n")
  return bad


def _folder_config(root, **dataset):
  c = _run_config(name="folder", root=root, num_classes=3, **dataset)
  c.augment.crop_size = (16, 16)
  c.augment.scale = (64, 16)
  return c


def test_bad_example_stops_the_run_by_default(tmp_path):
  root = str(tmp_path / "d")
  _folder_with_a_corrupt_jpeg(root)
  c = _folder_config(root)
  assert c.dataset.skip_bad_examples is False
  it = pipeline.make_train_iterator(c, 0, 1)
  with pytest.raises(ValueError, match=r"cannot decode image .*ex05\.jpg"):
    for _ in range(3):  # one epoch: 12 examples in batches of 4
      next(it)


def test_skip_bad_examples_full_batches_deterministic_resumable(tmp_path):
  root = str(tmp_path / "d")
  bad = _folder_with_a_corrupt_jpeg(root)
  c = _folder_config(root, skip_bad_examples=True)
  before = pipeline.skipped_examples()
  it = pipeline.make_train_iterator(c, 0, 1)
  first = [next(it) for _ in range(4)]  # past the first epoch's 11 good examples
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  for b in first + expected:
    assert b["image"].shape == (4, 16, 16, 3) and b["label"].shape == (4, 16, 16)
  # Exactly one distinct file skipped, and it is the corrupt one.
  new = {k: v - before.get(k, 0) for k, v in pipeline.skipped_examples().items()
         if v > before.get(k, 0)}
  assert list(new) == [bad] and new[bad] >= 1
  # The 11 good examples of epoch 1 fill batches 1-2 and 3/4 of batch 3: they are all distinct.
  epoch = np.concatenate([b["image"] for b in first])[:11].reshape(11, -1)
  assert len(np.unique(epoch, axis=0)) == 11
  fresh = pipeline.make_train_iterator(c, 0, 1)
  for want in first:
    np.testing.assert_array_equal(next(fresh)["image"], want["image"])
  resumed = pipeline.make_train_iterator(c, 0, 1)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])


def test_skip_bad_examples_changes_nothing_on_clean_data():
  # Batching after to_iter_dataset gives the same stream as MapDataset.batch.
  plain = pipeline.make_train_iterator(_run_config(), 0, 1)
  skipping = pipeline.make_train_iterator(_run_config(skip_bad_examples=True), 0, 1)
  for _ in range(2):
    a, b = next(plain), next(skipping)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def test_skip_bad_examples_wrapper_counts_and_logs(tmp_path, caplog):
  root = str(tmp_path / "d")
  bad = _folder_with_a_corrupt_jpeg(root, n=6)  # ex05 is the 6th file
  source = pipeline.SkipBadExamples(
      registry.get_source(_folder_config(root).dataset, "train"))
  assert len(source) == 6 and source.class_names == ("a", "b", "c")
  before = pipeline.skipped_examples().get(bad, 0)
  with caplog.at_level("WARNING"):
    records = [source[i] for i in range(len(source))]
    assert source[5] is None
  assert [r is None for r in records] == [False] * 5 + [True]
  assert pipeline.skipped_examples()[bad] - before == 2  # read twice, counted twice
  warnings = [r.getMessage() for r in caplog.records if "skipping bad example" in r.getMessage()]
  assert len(warnings) == 1 and bad in warnings[0] and "cannot decode image" in warnings[0]
  # Nothing left to skip to: an error instead of an endless search for a good example.
  only_bad = pipeline.SkipBadExamples(
      files.SegmentationFiles([source.source.pairs[5]] * 2, source.class_names))
  assert only_bad[0] is None
  with pytest.raises(ValueError, match=r"all 2 examples of .* failed to read"):
    only_bad[1]


# ----------------------------------------------------------------------------------------------
# EoMT augmentation (config.augment.pipeline = "eomt").


def test_new_config_defaults_keep_the_segvit_pipeline():
  c = _run_config()
  assert c.augment.pipeline == "segvit" and c.dataset.skip_bad_examples is False
  assert c.augment.scale_jitter == (0.5, 2.0) and c.augment.color_jitter is True
  assert [type(op).__name__ for op in pipeline.train_transforms(c)] == [
      "RandomResize", "RandomCrop", "RandomFlip", "PhotoMetricDistortion", "Normalize", "Pad",
      "Format"]
  c.augment.pipeline = "eomt"
  assert [type(op).__name__ for op in pipeline.train_transforms(c)] == [
      "ColorJitter", "RandomFlip", "ScaleJitter", "Pad", "RandomCrop", "Normalize", "Format"]
  c.augment.color_jitter = False
  assert type(pipeline.train_transforms(c)[0]).__name__ == "RandomFlip"
  c.augment.pipeline = "lsj"
  with pytest.raises(ValueError, match="unknown config.augment.pipeline 'lsj'; known: segvit"):
    pipeline.train_transforms(c)


def test_scale_jitter_size_numbers():
  # factor * crop / long side, keep ratio, truncated (torchvision ScaleJitter).
  assert T.scale_jitter_size(375, 500, (512, 512), 1.0) == (384, 512)
  assert T.scale_jitter_size(375, 500, (512, 512), 0.5) == (192, 256)
  assert T.scale_jitter_size(375, 500, (512, 512), 2.0) == (768, 1024)
  assert T.scale_jitter_size(1024, 2048, (1024, 1024), 0.1) == (51, 102)
  assert T.scale_jitter_size(10, 10, (4, 4), 0.01) == (1, 1)


def test_scale_jitter_factor_range_and_nearest_labels():
  image = np.zeros((40, 60, 3), np.uint8)
  label = np.full((40, 60), 3, np.uint8)
  label[:20, :30], label[20:, 30:] = 0, 255
  longs = []
  for seed in range(60):
    out_image, out_label = T.scale_jitter(image, label, np.random.default_rng(seed), (32, 32),
                                          (0.5, 2.0))
    factor = np.random.default_rng(seed).uniform(0.5, 2.0)
    expected = T.scale_jitter_size(40, 60, (32, 32), factor)
    assert out_image.shape == expected + (3,) and out_label.shape == expected
    assert set(np.unique(out_label)) == {0, 3, 255}  # nearest: values kept, none invented
    longs.append(out_label.shape[1])
  assert 16 <= min(longs) < 20 and 60 < max(longs) <= 64  # long side 32 x [0.5, 2.0]


def test_color_jitter_ops_numbers_and_determinism():
  pixel = np.array([[[100, 50, 200], [10, 20, 30]]], np.uint8)
  np.testing.assert_array_equal(T.adjust_brightness(pixel, 1.5), [[[150, 75, 255], [15, 30, 45]]])
  # Grey = floor(0.2989 R + 0.587 G + 0.114 B) = 82 and 18; contrast blends with their mean 50.
  np.testing.assert_array_equal(T.grayscale(pixel)[..., 0], [[82, 18]])
  np.testing.assert_array_equal(T.adjust_contrast(pixel, 0.5), [[[75, 50, 125], [30, 35, 40]]])
  np.testing.assert_array_equal(T.adjust_saturation(pixel, 0.0), [[[82] * 3, [18] * 3]])
  np.testing.assert_array_equal(T.adjust_hue(np.array([[[255, 0, 0]]], np.uint8), 0.5),
                                [[[0, 255, 255]]])  # half a turn: red -> cyan
  image = synthetic.SyntheticSegmentation("train", 1, 32)[0]["image"]
  np.testing.assert_array_equal(T.color_jitter(image, np.random.default_rng(0), 0, 0, 0, 0),
                                image)
  outs = []
  for seed in range(8):
    a = T.color_jitter(image, np.random.default_rng(seed), **JITTER)
    np.testing.assert_array_equal(a, T.color_jitter(image, np.random.default_rng(seed), **JITTER))
    assert a.dtype == np.uint8 and a.shape == image.shape
    outs.append(a)
  assert sum(not np.array_equal(o, image) for o in outs) >= 6


def _eomt_config(**augment):
  c = _run_config()
  c.augment.pipeline = "eomt"
  c.augment.update(augment)
  return c


def test_eomt_pipeline_shapes_and_determinism():
  c = _eomt_config()
  batches = [next(pipeline.make_train_iterator(c, 0, 1)) for _ in range(2)]
  b = batches[0]
  assert b["image"].shape == (4, 48, 48, 3) and b["image"].dtype == np.float32
  assert b["label"].shape == (4, 48, 48) and b["label"].dtype == np.int32
  assert set(np.unique(b["label"])) <= set(range(6)) | {255}
  np.testing.assert_array_equal(batches[0]["image"], batches[1]["image"])
  np.testing.assert_array_equal(batches[0]["label"], batches[1]["label"])
  c.seed = 1
  assert not np.array_equal(next(pipeline.make_train_iterator(c, 0, 1))["image"], b["image"])


def test_eomt_pipeline_pads_image_black_and_label_ignore():
  # 64x64 synthetic images scaled by 0.25 * 48 / 64 -> 12x12, padded to 48x48, cropped whole.
  c = _eomt_config(scale_jitter=(0.25, 0.25), color_jitter=False)
  b = next(pipeline.make_train_iterator(c, 0, 1))
  assert (b["label"][:, 12:] == 255).all() and (b["label"][:, :, 12:] == 255).all()
  assert (b["label"][:, :12, :12] != 255).all()
  # Padded with 0 before normalising: (0 - 127.5) / 127.5.
  assert (b["image"][:, 12:] == -1.0).all() and (b["image"][:, :, 12:] == -1.0).all()
  p_image, p_label = T.pad(np.full((2, 3, 3), 9, np.uint8), np.ones((2, 3), np.uint8), (4, 4), 0,
                           255)
  assert p_image.dtype == np.uint8 and (p_image[2:] == 0).all() and (p_image[:, 3:] == 0).all()
  assert (p_label[2:] == 255).all() and (p_label[:, 3:] == 255).all()


def test_closed_form_hsv_ops_equal_the_hsv_round_trip():
  """Saturation scaling and hue shifts are computed without building HSV arrays; they equal
  the round trip through rgb_to_hsv / hsv_to_rgb rounded to uint8, except by 1 where the exact
  value is a .5 tie (the two float32 computations land on either side of it)."""
  image = np.random.default_rng(0).integers(0, 256, (64, 64, 3)).astype(np.uint8)
  image[0, :8] = [[0, 0, 0], [255, 255, 255], [7, 7, 7], [255, 0, 0], [0, 255, 0],
                  [0, 0, 255], [10, 200, 200], [200, 10, 200]]  # grey, pure and tied hues

  def round_trip(fn, rounded=True):
    out = T.hsv_to_rgb(fn(T.rgb_to_hsv(image)))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8) if rounded else out

  cases = [(T.adjust_saturation_hsv, a, lambda hsv, a=a: np.stack(
      [hsv[..., 0], np.clip(hsv[..., 1] * a, 0, 255), hsv[..., 2]], -1))
           for a in (0.5, 0.9, 1.3, 1.5)]
  cases += [(T.shift_hue_hsv, d, lambda hsv, d=d: np.stack(
      [np.mod(hsv[..., 0] + d, 180.0), hsv[..., 1], hsv[..., 2]], -1))
            for d in (-18, -5, 1, 17, 3.6)]
  for op, arg, hsv_fn in cases:
    diff = np.abs(op(image, arg).astype(int) - round_trip(hsv_fn))
    exact = round_trip(hsv_fn, rounded=False)
    tie = np.abs(exact - np.floor(exact) - 0.5) < 1e-3
    assert diff.max() <= 1 and not (diff > 0)[~tie].any(), (op.__name__, arg)
