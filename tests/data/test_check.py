"""Tests for segvit_jax.data.check: the dataset validation tool (pure functions and the CLI)."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from segvit_jax.data import check
from segvit_jax.data import registry
from segvit_jax.data import synthetic
from tests import support


def _write(root, split, name, label, image_shape=None, ext=".jpg"):
  """root/images/split/name.ext (random image, label's size unless image_shape) and the label."""
  os.makedirs(os.path.join(root, "images", split), exist_ok=True)
  os.makedirs(os.path.join(root, "annotations", split), exist_ok=True)
  label = np.asarray(label, np.uint8)
  h, w = image_shape or label.shape
  image = np.random.default_rng(0).integers(0, 256, (h, w, 3)).astype(np.uint8)
  path = os.path.join(root, "images", split, name + ext)
  Image.fromarray(image).save(path)
  Image.fromarray(label, mode="L").save(os.path.join(root, "annotations", split, name + ".png"))
  return path


def _clean_dataset(root):
  """4 classes (the last in no image); train: 10 pixels, 2 ignored, class pixels 4 / 2 / 2 / 0."""
  _write(root, "train", "a", [[0, 0, 1], [1, 255, 0]], ext=".png")
  _write(root, "train", "b", [[2, 2], [0, 255]])
  _write(root, "val", "c", [[1, 1], [1, 1]])
  with open(os.path.join(root, "classes.txt"), "w") as f:
    f.write("sky\nroad\ncar\nbus\n")


def _bad_dataset(root):
  """train: 2 good examples, a corrupt JPEG, a size-mismatched label, an out-of-range label."""
  _write(root, "train", "good1", [[0, 1], [1, 0]])
  _write(root, "train", "good2", [[2, 2], [255, 0]])
  corrupt = _write(root, "train", "corrupt", [[0, 0], [0, 0]])
  with open(corrupt, "wb") as f:
    f.write(b"\xff\xd8\xff\xe0 truncated, not a jpeg")
  _write(root, "train", "mismatch", [[0, 1, 2], [0, 1, 2], [0, 1, 2]], image_shape=(2, 2))
  _write(root, "train", "range", [[0, 9], [1, 255]])
  _write(root, "val", "fine", [[0, 1], [2, 255]])
  with open(os.path.join(root, "classes.txt"), "w") as f:
    f.write("a\nb\nc\n")


def _folder_cfg(root, num_classes):
  return support.dataset_config(name="folder", root=root, num_classes=num_classes,
                                ignore_index=255, reduce_zero_label=False)


def test_check_source_counts_a_clean_dataset_exactly(tmp_path):
  root = str(tmp_path / "clean")
  _clean_dataset(root)
  source = registry.get_source(_folder_cfg(root, 4), "train")
  report = check.check_source(source, progress=False, split="train")
  assert report.ok and report.num_examples == 2 and report.num_good == 2
  assert (report.num_pixels, report.num_ignored, report.num_labelled) == (10, 2, 8)
  np.testing.assert_array_equal(report.class_pixels, [4, 2, 2, 0])
  np.testing.assert_array_equal(report.class_images, [2, 1, 1, 0])
  np.testing.assert_allclose(report.class_share(), [50.0, 25.0, 25.0, 0.0])
  text = check.format_report(report)
  assert text.splitlines()[:3] == [
      "split train: 2 examples (2 good, 0 bad)",
      "  pixels: 10 (2 ignored = 20.00%, ignore_index 255)",
      "    id  name  pixels %   images",
  ]
  assert "     0  sky      50.00        2" in text
  assert "     3  bus       0.00        0" in text
  assert "1 class(es) in no image: bus" in text
  # A thread pool gives the same report.
  pooled = check.check_source(source, workers=3, progress=False, split="train")
  np.testing.assert_array_equal(pooled.class_pixels, report.class_pixels)
  np.testing.assert_array_equal(pooled.class_images, report.class_images)


def test_check_source_lists_every_bad_file(tmp_path):
  root = str(tmp_path / "bad")
  _bad_dataset(root)
  source = registry.get_source(_folder_cfg(root, 3), "train")
  report = check.check_source(source, workers=2, progress=False)
  assert not report.ok and report.num_examples == 5 and report.num_good == 2
  files = [os.path.basename(name) for name, _ in report.bad]
  assert files == ["corrupt.jpg", "mismatch.jpg", "range.jpg"]  # index (= name) order
  reasons = dict(zip(files, (reason for _, reason in report.bad)))
  assert "cannot decode image" in reasons["corrupt.jpg"]
  assert "is 3x3 (WxH) but image" in reasons["mismatch.jpg"]
  assert "range.png has value(s) 9 outside the valid range 0..2" in reasons["range.jpg"]
  # Only the good examples are counted.
  assert (report.num_pixels, report.num_ignored) == (8, 1)
  np.testing.assert_array_equal(report.class_pixels, [3, 2, 2])


def test_check_example_holds_any_source_to_the_record_contract():
  record = dict(image=np.zeros((2, 3, 3), np.uint8), label=np.array([[0, 1, 255], [5, 1, 1]]))
  with pytest.raises(ValueError, match=r"ex 7 has value\(s\) 5"):
    check.check_example(record, 2, 255, "ex 7")
  with pytest.raises(ValueError, match="label has shape"):
    check.check_example(dict(image=record["image"], label=np.zeros((3, 2))), 2, 255, "x")
  counts, pixels, ignored = check.check_example(
      dict(image=record["image"], label=np.array([[0, 1, 255], [0, 1, 1]])), 2, 255, "x")
  assert counts.tolist() == [2, 3] and (pixels, ignored) == (6, 1)
  # Sources without files are named by index.
  source = synthetic.SyntheticSegmentation("val", 3, 32)
  assert check.example_file(source, 2) == "example 2"
  report = check.check_source(source, progress=False)
  assert report.ok and report.num_pixels == 3 * 32 * 32 and report.class_pixels.sum() > 0


def _run_check(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "segvit_jax.data.check", *args], cwd=support.ROOT,
                        env=env, capture_output=True, text=True, timeout=120, check=False)


def test_cli_exit_status_and_output(tmp_path):
  bad_root = str(tmp_path / "bad")
  _bad_dataset(bad_root)
  clean_root = str(tmp_path / "clean")
  _clean_dataset(clean_root)
  common = ["--config", "configs/demo.py", "--config.dataset.name=folder", "--workers", "2"]
  proc = _run_check(*common, f"--config.dataset.root={bad_root}", "--config.dataset.num_classes=3")
  assert proc.returncode != 0
  for name in ("corrupt.jpg", "mismatch.jpg", "range.jpg"):
    assert os.path.join(bad_root, "images", "train", name) in proc.stdout, proc.stdout
  assert "split val: 1 examples (1 good, 0 bad)" in proc.stdout  # --split both by default
  assert "error: 3 bad example(s)" in proc.stderr
  proc = _run_check(*common, f"--config.dataset.root={clean_root}",
                    "--config.dataset.num_classes=4", "--split", "train")
  assert proc.returncode == 0, proc.stderr
  assert "split train: 2 examples (2 good, 0 bad)" in proc.stdout
  assert "     1  road     25.00        1" in proc.stdout
  assert "split val" not in proc.stdout
