"""The tools of `segvit_jax.tools` (plot, browse, benchmark) and the parameter count of
`segvit_jax.flops`, on the demo's smoke config and one tiny trained workdir + bundle (a 2-step
smoke run and export_bundle, shared by the module). Their --help is in test_cli.py."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from configs import demo
from segvit_jax import bundle as bundle_lib
from segvit_jax import checkpoint, flops, runtime, trainer
from segvit_jax.data import palettes, pipeline
from segvit_jax.evaluation import pictures
from segvit_jax.tools import benchmark, browse, plot

from tests.support import run


def smoke_config(steps: int | None = None):
  config = demo.get_config("smoke")
  if steps is not None:
    config.total_steps = steps
    config.log_every = 1
    config.ckpt_every = steps
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(workdir, bundle directory) of a 2-step smoke run (a loss record per step)."""
  root = tmp_path_factory.mktemp("tools")
  workdir = str(root / "run")
  trainer.train(smoke_config(steps=2), workdir)
  out = str(root / "bundle")
  run("-m", "segvit_jax.export_bundle", "--workdir", workdir, "--output", out)
  return workdir, out


def records_of(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------
# plot

def test_plot_overlays_runs_one_panel_per_key(trained, tmp_path):
  workdir, _ = trained
  other = tmp_path / "other"
  other.mkdir()
  # A second run: the first's records with the loss halved.
  with open(other / "metrics.jsonl", "w") as f:
    for r in records_of(workdir):
      f.write(json.dumps({**r, "loss": r["loss"] / 2} if "loss" in r else r) + "\n")
  out = str(tmp_path / "curves.png")
  fig = plot.plot_workdirs([workdir, str(other)], ["loss", "lr"], out)
  assert Image.open(out).size == (1280, 400)  # 2 panels of 6.4 x 4.0 inches at 100 dpi
  axes = [ax for ax in fig.axes if ax.get_visible()]
  assert [ax.get_title() for ax in axes] == ["loss", "lr"]
  assert [ax.get_xlabel() for ax in axes] == ["step", "step"]
  assert [ax.get_ylabel() for ax in axes] == ["loss", "lr"]
  for ax in axes:
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["run", "other"]
  losses = [r["loss"] for r in records_of(workdir) if "loss" in r]
  assert len(losses) == 2
  (steps_a, loss_a), (steps_b, loss_b) = (line.get_xydata().T for line in axes[0].get_lines())
  assert list(steps_a) == list(steps_b) == [1, 2]
  np.testing.assert_allclose(loss_a, losses, rtol=0, atol=0)  # max abs difference 0
  np.testing.assert_allclose(loss_b, np.asarray(losses) / 2, rtol=1e-12)


def test_plot_command_takes_a_comma_list(trained, tmp_path):
  """The command line (a subprocess: in-process, its required --workdir would stay required
  for every later absl tool of the session)."""
  workdir, _ = trained
  out = str(tmp_path / "c.png")
  proc = run("-m", "segvit_jax.tools.plot", f"--workdir={workdir},{workdir}", "--keys=loss",
             f"--output={out}")
  assert Image.open(out).size == (640, 400)
  assert f"wrote {out} (loss of 2 runs)" in proc.stdout


def test_plot_run_names_are_distinct(tmp_path):
  (tmp_path / "a" / "run").mkdir(parents=True)
  (tmp_path / "b" / "run").mkdir(parents=True)
  (tmp_path / "b" / "run" / "metrics.jsonl").write_text("")
  a, b = str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run")
  assert plot.run_names([a, str(tmp_path / "b")]) == ["run", "b"]
  assert plot.run_names([a, b]) == [a, b]  # alike names: the paths
  assert plot.run_names([a, a]) == ["run", "run (2)"]  # one run twice: two lines
  assert plot.run_names([a, a, os.path.join(b, "metrics.jsonl")]) == [
      a, f"{a} (2)", os.path.join(b, "metrics.jsonl")]
  assert plot.split_workdirs(["x,y", "z", "w,"]) == ["x", "y", "z", "w"]


def test_plot_missing_key_and_empty_file_name_the_file(trained, tmp_path):
  workdir, _ = trained
  path = os.path.join(workdir, "metrics.jsonl")
  with pytest.raises(ValueError) as e:
    plot.plot_workdirs([workdir], ["loss", "mIoU"], str(tmp_path / "x.png"))
  message = str(e.value)
  assert message.startswith(f"{path} has no key 'mIoU'; keys there: ")
  assert {"loss", "lr"} <= set(message.split("keys there: ")[1].split(", "))
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "metrics.jsonl").write_text("")
  with pytest.raises(ValueError, match="empty/metrics.jsonl holds no metrics records$"):
    plot.plot_workdirs([str(tmp_path / "empty")], ["loss"], str(tmp_path / "x.png"))
  with pytest.raises(FileNotFoundError, match="nowhere/metrics.jsonl not found"):
    plot.plot_workdirs([str(tmp_path / "nowhere")], ["loss"], str(tmp_path / "x.png"))
  assert not (tmp_path / "x.png").exists()


def test_plot_without_matplotlib_says_how_to_install(trained, tmp_path, monkeypatch):
  monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import fails
  with pytest.raises(runtime.app.UsageError, match=r"pip install -e '\.\[tools\]'"):
    plot.plot_workdirs([trained[0]], ["loss"], str(tmp_path / "x.png"))


# ---------------------------------------------------------------------------------------------
# browse

def test_browse_shows_the_pipelines_samples_in_the_palette(tmp_path):
  config = smoke_config()
  out = str(tmp_path / "browse.png")
  browse.browse(config, 5, out, cols=2, min_side=256)
  # 32 px crops enlarged x8 to 256; 3 rows of 2 [image | label] pairs, 4-px gaps, titles.
  gap, title, side = browse.GAP, browse.TITLE, 256
  width, height = gap + 2 * (2 * side + 2 * gap), gap + 3 * (side + title + gap)
  assert (width, height) == (1044, 826)
  picture = np.asarray(Image.open(out))
  # Below the grid, one legend row (the 6 synthetic classes fit in 1044 px).
  assert picture.shape == (height + gap + browse.LEGEND_ROW + gap, width, 3)
  # The first sample is the training iterator's first: de-normalised image and its labels in
  # the dataset's palette, exactly (max abs difference 0).
  batch = next(pipeline.make_train_iterator(config, process_index=0, process_count=1))
  image = browse.denormalize(batch["image"][0], config.mean, config.std)
  colours = palettes.palette_for("synthetic", 6)
  y, x = gap + title, gap
  np.testing.assert_array_equal(picture[y:y + side:8, x:x + side:8], image)
  np.testing.assert_array_equal(picture[y:y + side:8, x + side + gap:x + 2 * side + gap:8],
                                pictures.colorize(batch["label"][0], colours))
  assert image.std() > 10  # a picture, not a constant
  # The legend's first swatch: the colour of the smallest class id shown (background here).
  shown = browse.present_classes(browse.take_samples(config, 5), 6)
  assert shown[0] == 0 and set(shown) <= set(range(6))
  swatch = picture[height + gap:height + gap + browse.SWATCH, gap:gap + browse.SWATCH]
  assert (swatch == colours[shown[0]]).all()


def test_legend_wraps_and_names_the_classes_shown():
  names = [f"class_{i}" for i in range(40)]
  colours = palettes.generated_palette(40)
  strip = browse.legend(list(range(40)), names, colours, 300)
  rows = (strip.shape[0] - 2 * browse.GAP) // browse.LEGEND_ROW
  assert strip.shape[1] == 300 and rows >= 5  # 40 entries of ~80 px in 300 px: wrapped
  assert (strip[browse.GAP, browse.GAP] == colours[0]).all()
  assert browse.legend([], names, colours, 300).shape == (0, 300, 3)
  # Ids past the names (or the palette) are left out, not an IndexError.
  assert browse.legend([50], names, colours, 300).shape == (0, 300, 3)


def test_class_map_of_a_panoptic_batch():
  """Segment-index maps show each segment's class; void (ignore_index) and segments of class
  -1 (padding) stay unknown (-1: black)."""
  label = np.array([[[0, 1], [2, 255]]], np.int32)
  batch = {"label": label, "segment_classes": np.array([[4, 1, -1, -1]], np.int32)}
  np.testing.assert_array_equal(browse.class_map(batch, 0), [[4, 1], [-1, -1]])
  np.testing.assert_array_equal(browse.class_map({"label": label}, 0), label[0])


def test_denormalize_inverts_the_pipelines_normalisation():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (4, 5, 3)).astype(np.uint8)
  mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
  x = (image - np.float32(mean)) / np.float32(std)
  np.testing.assert_array_equal(browse.denormalize(x, mean, std), image)


# ---------------------------------------------------------------------------------------------
# benchmark

def test_benchmark_bundle_table_and_json(trained, tmp_path):
  _, bundle_dir = trained
  b = checkpoint.load_model(bundle_dir)
  row = benchmark.benchmark(b, iters=4, warmup=1)
  assert tuple(row) == benchmark.COLUMNS
  assert (row["size"], row["batch"], row["iters"], row["protocol"]) == ("32x32", 1, 4, "model")
  assert 0 < row["p50 ms"] <= row["p90 ms"]
  np.testing.assert_allclose(row["FPS"], 1e3 / row["mean ms"], rtol=1e-12)
  header, values = benchmark.format_table(row).splitlines()
  assert [c.strip() for c in header.split("  ") if c.strip()] == [
      "model", "device", "protocol", "size", "batch", "iters", "mean ms", "p50 ms", "p90 ms",
      "FPS"]
  assert values.split()[-1] == f"{row['FPS']:.2f}"
  benchmark.write_json(row, str(tmp_path / "b.json"))
  with open(tmp_path / "b.json") as f:
    assert json.load(f) == row


def test_benchmark_config_with_random_weights():
  config = smoke_config()
  b = benchmark.random_bundle(config)
  assert benchmark.default_size(config) == (32, 32)
  row = benchmark.benchmark(b, size=(48, 40), batch=2, iters=2, warmup=1, protocol="whole")
  assert (row["size"], row["batch"], row["protocol"]) == ("48x40", 2, "whole")
  np.testing.assert_allclose(row["FPS"], 2e3 / row["mean ms"], rtol=1e-12)


def test_benchmark_needs_exactly_one_source():
  with pytest.raises(runtime.app.UsageError, match="exactly one of --checkpoint"):
    benchmark.load(None, None, None)
  with pytest.raises(FileNotFoundError, match="--checkpoint /nowhere/bundle does not exist"):
    benchmark.load("/nowhere/bundle", None, None)


# ---------------------------------------------------------------------------------------------
# flops: the parameter count

def test_flops_parameter_count_equals_the_params_tree(trained):
  _, bundle_dir = trained
  params = bundle_lib.load_bundle(bundle_dir).variables["params"]
  counts = flops.param_counts(smoke_config())
  size = lambda tree: sum(int(np.size(x)) for x in jax.tree.leaves(tree))  # noqa: E731
  assert counts == {"total": size(params), "backbone": size(params["backbone"]),
                    "head": size(params["head"])}
  assert counts["total"] == counts["backbone"] + counts["head"]
  assert flops.format_params(counts) == (
      f"parameters: {counts['total']:,} (backbone {counts['backbone']:,}, "
      f"head {counts['head']:,})")


def test_flops_segformer_b0_parameters_match_transformers():
  """README's SegFormer table: B0 with 150 classes has 3,752,694 parameters, as transformers'
  SegformerForSemanticSegmentation."""
  from segvit_jax import config_utils  # pylint: disable=import-outside-toplevel
  config = config_utils.load_config("configs/segformer_b0_ade20k.py")
  assert flops.param_counts(config)["total"] == 3_752_694


def test_flops_command_prints_the_parameter_count():
  lines = flops.report(smoke_config(), 32, 32).splitlines()
  counts = flops.param_counts(smoke_config())
  assert lines[-2] == flops.format_params(counts)
  assert lines[-1].startswith("GFLOPs: ")  # still the last line (tests/test_flops.py)
