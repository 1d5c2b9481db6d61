"""The command-line tools end to end on a seconds-long synthetic run: train.py errors,
eval.py, export_bundle, load_bundle / predict, predict.py; and the one command-line style of
every entry point: --help lists its own flags and exits 0, a user's mistake is one line."""

import json
import os
import re
import time

import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import demo
from segvit_jax import bundle as bundle_lib
from segvit_jax import checkpoint, trainer
from segvit_jax.data import palettes, synthetic
from segvit_jax.evaluation import inference, pictures

from tests import fabricate
from tests.support import run


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("run"))
  trainer.train(demo.get_config("smoke"), path)
  return path


def test_missing_dataset_fails_fast_naming_the_path(tmp_path):
  t0 = time.perf_counter()
  proc = run("train.py", "--config", "configs/segvit_vit_l16_ade20k.py", "--workdir",
             str(tmp_path), "--config.dataset.root=/nonexistent/ADEChallengeData2016",
             "--config.model_init=",  # (a missing model_init file is reported first)
             check=False)
  assert proc.returncode != 0
  assert "/nonexistent/ADEChallengeData2016" in proc.stderr
  assert "FileNotFoundError" in proc.stderr
  assert time.perf_counter() - t0 < 60  # seconds, not a compile or a training step


def test_unknown_config_key_is_named(tmp_path):
  proc = run("train.py", "--config", "configs/demo.py:smoke", "--workdir", str(tmp_path),
             "--config.optim.learning_rate=1", check=False)
  assert proc.returncode != 0
  assert ("unknown config key 'optim.learning_rate' in '--config.optim.learning_rate=1': "
          "optim has no 'learning_rate'") in proc.stderr


def test_eval_writes_results_and_pictures(workdir):
  proc = run("eval.py", "--config", "configs/demo.py:smoke", "--workdir", workdir)
  with open(os.path.join(workdir, "eval_results.json")) as f:
    results = json.load(f)
  assert set(results) >= {"mIoU", "mAcc", "aAcc", "per_class"}
  assert [c["name"] for c in results["per_class"]] == list(synthetic.CLASS_NAMES)
  assert 0 <= results["aAcc"] <= 100
  assert "mIoU" in proc.stdout
  assert len(os.listdir(os.path.join(workdir, "pictures"))) == 4  # num_eval = 4


def test_bundle_export_load_predict(workdir, tmp_path):
  out = str(tmp_path / "bundle")
  run("-m", "segvit_jax.export_bundle", "--workdir", workdir, "--output", out)
  b = bundle_lib.load_bundle(out)
  assert b.config.model.num_classes == 6 and b.config.step == 6
  assert list(b.config.class_names) == list(synthetic.CLASS_NAMES)
  # The training run's test protocol travels with the bundle (and with the workdir).
  config = ml_collections.ConfigDict(bundle_lib.read_config(workdir))
  assert b.config.eval.to_dict() == config.eval.to_dict()
  # A 44 x 56 image (not a multiple of the patch 8 in height): scores at the input size.
  images = np.random.default_rng(0).integers(0, 256, (2, 44, 56, 3), dtype=np.uint8)
  scores = b.predict(images, protocol="whole")
  assert scores.shape == (2, 6, 44, 56) and scores.dtype == np.float32
  # mmseg's rule for a ViT: the normalised input zero-padded to 48 x 56, the model's scores
  # there resized (bilinear) to 44 x 56.
  x = (images.astype(np.float32) - np.float32(b.config.mean)) / np.float32(b.config.std)
  direct = b.model.apply(b.variables, np.pad(x, ((0, 0), (0, 4), (0, 0), (0, 0))))
  direct = inference.resize_scores(direct["semantic_scores"], (44, 56))
  np.testing.assert_allclose(scores, np.asarray(direct), atol=1e-5)
  # The recorded protocol is what predict runs by default (the workdir's the same).
  p = b.protocol()
  assert (p.mode, p.crop, p.test_resize.ratios) == (
      config.eval.mode, tuple(config.eval.crop_size), tuple(config.eval.scales))
  recorded = b.predict(images)
  assert recorded.shape == (2, 6, 44, 56)
  w = checkpoint.load_model(workdir)
  np.testing.assert_array_equal(w.predict(images), recorded)
  with pytest.raises(ValueError, match="uint8"):
    b.predict(images.astype(np.float32))


def test_predict_cli(workdir, tmp_path):
  src = synthetic.SyntheticSegmentation("val", 2, 32, seed=0)
  inputs = tmp_path / "inputs"
  inputs.mkdir()
  for i in range(2):
    Image.fromarray(src[i]["image"]).save(inputs / f"img{i}.png")
  (inputs / "broken.jpg").write_bytes(b"not a jpeg")
  Image.fromarray(src[0]["image"]).save(inputs / "cut.jpg")
  (inputs / "cut.jpg").write_bytes((inputs / "cut.jpg").read_bytes()[:300])  # truncated
  out = tmp_path / "out"
  proc = run("predict.py", "--checkpoint", workdir, "--input", str(inputs / "img0.png"),
             "--output", str(out), "--save-scores")
  pred = np.asarray(Image.open(out / "img0.png"))
  scores = np.load(out / "img0.npy")
  assert pred.shape == (32, 32) and scores.shape == (6, 32, 32)
  np.testing.assert_array_equal(pred, scores.argmax(0))
  assert (out / "img0_overlay.jpg").exists()
  assert "wrote 1 predictions" in proc.stdout
  out = tmp_path / "folder"
  proc = run("predict.py", "--checkpoint", workdir, "--input", str(inputs), "--output",
             str(out), check=False)
  # The bad files are named and skipped, the good ones written; exit status 1.
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert "error: 2 of 4 images skipped:" in proc.stderr
  assert f"{inputs / 'broken.jpg'}: cannot decode image" in proc.stderr
  assert f"{inputs / 'cut.jpg'}: cannot decode image" in proc.stderr
  assert sorted(os.listdir(out)) == ["img0.png", "img0_overlay.jpg", "img1.png",
                                     "img1_overlay.jpg"]


def painted_colours(overlay, image, label):
  """{class: its colour} read back from a 50% overlay (JPEG-decoded): the median over the
  class's pixels of 2 x overlay - image."""
  colour = 2.0 * np.asarray(overlay, np.float64) - np.asarray(image, np.float64)
  return {int(c): np.median(colour[label == c], axis=0) for c in np.unique(label)
          if np.sum(label == c) >= 64}


def nearest(colour, palette):
  return int(np.argmin(np.linalg.norm(palette.astype(np.float64) - colour, axis=-1)))


def test_predict_and_eval_pictures_share_the_classes_palette(workdir, tmp_path):
  """predict.py's overlays and eval.py's pictures colour a class alike: with the palette of
  the classes' names (`palettes.palette_for_class_names`), the one the bundle's class names and
  the dataset's give: read back from the JPEGs (lossy on small textured images), every class's
  colour is nearest to its own palette entry."""
  colours = palettes.palette_for_class_names(synthetic.CLASS_NAMES)
  size = 96  # larger than the smoke run's images: regions big enough to read JPEG colours from
  record = synthetic.SyntheticSegmentation("val", 4, size, seed=0)[0]
  Image.fromarray(record["image"]).save(tmp_path / "photo.png")
  run("predict.py", "--checkpoint", workdir, "--input", str(tmp_path / "photo.png"),
      "--output", str(tmp_path / "pred"))
  pred = np.asarray(Image.open(tmp_path / "pred" / "photo.png"))
  # The overlay at the top left, enlarged x 3 (nearest) to a 256-px short side, its legend below.
  overlay = np.asarray(Image.open(tmp_path / "pred" / "photo_overlay.jpg"))
  assert overlay.shape[1] == 3 * size and overlay.shape[0] > 3 * size
  overlay = overlay[1:3 * size:3, 1:3 * size:3]  # each enlarged pixel's centre
  got = painted_colours(overlay, record["image"], pred)
  assert got and all(nearest(colour, colours) == c for c, colour in got.items())
  run("eval.py", "--config", "configs/demo.py:smoke", "--workdir", workdir, "--output",
      str(tmp_path / "eval"), "--num_vis", "1", f"--config.dataset.image_size={size}")
  panel = np.asarray(Image.open(tmp_path / "eval" / "pictures" / f"{record['name']}.jpg"))
  # [image | ground truth | prediction | overlay] enlarged x 3; the ground truth solid.
  lay = pictures.panel_layout(size, size, pictures.PANEL_TITLES, [0], synthetic.CLASS_NAMES)
  assert lay.factor == 3 and panel.shape[1] == lay.width
  x, y = lay.panel_x[1], lay.panels_top
  truth = panel[y:y + lay.panel_h:3, x:x + lay.panel_w:3].astype(np.float64)
  got = {int(c): np.median(truth[record["label"] == c], axis=0)
         for c in np.unique(record["label"]) if np.sum(record["label"] == c) >= 64}
  assert len(got) >= 3 and all(nearest(colour, colours) == c for c, colour in got.items())


def test_train_ade20k_config_on_fabricated_copy(tmp_path):
  """The paper config's data path (ADE20K layout, reduce_zero_label, 150 classes, the mmseg
  augmentations, slide evaluation) end to end: its `:smoke` variant (the model shrunk, 64 px
  crops, batch 2, two steps logged and evaluated, no pretrained weights), in seconds."""
  root = str(tmp_path / "ADEChallengeData2016")
  fabricate.ade20k(root)
  workdir = str(tmp_path / "run")
  run("train.py", "--config", "configs/segvit_vit_b16_ade20k.py:smoke", "--workdir", workdir,
      f"--config.dataset.root={root}")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f if '"loss"' in line]
  assert steps == [1, 2]
  with open(os.path.join(workdir, "classes.txt")) as f:
    classes = f.read().split("\n")
  assert classes[:3] == ["wall", "building", "sky"] and classes[149] == "flag"


# ----------------------------------------------------------------------------------------------
# One command-line style: every entry point's --help lists its own flags, one line each.

DISTRIBUTED = ("coordinator_address", "num_processes", "process_id")
# (command, its own flags, {alias: flag})
ENTRY_POINTS = {
    "train": (["train.py"], ("config", "workdir", *DISTRIBUTED, "compilation_cache"), {}),
    "eval": (["eval.py"], ("config", "workdir", "checkpoint", "step", "output", "split",
                           "num_vis", "scales", "flip", *DISTRIBUTED, "compilation_cache"),
             {"num-vis": "num_vis"}),
    "predict": (["predict.py"], ("checkpoint", "input", "output", "save_scores", "step", "task",
                                 "protocol", "config", "scales", "flip", "size", "categories", "object_mask_threshold",
                                 "overlap_threshold", "compilation_cache"),
                {"save-scores": "save_scores", "object-mask-threshold": "object_mask_threshold",
                 "overlap-threshold": "overlap_threshold",
                 "compilation-cache": "compilation_cache"}),
    "export_bundle": (["-m", "segvit_jax.export_bundle"],
                      ("workdir", "output", "step", "overwrite"), {}),
    "export": (["-m", "segvit_jax.export"],
               ("format", "height", "width", "dynamic", "batch", "dynamic_batch", "dtype",
                "input", "logits", "platforms", "overwrite"), {"dynamic-batch": "dynamic_batch"}),
    "data.check": (["-m", "segvit_jax.data.check"], ("config", "split", "workers"), {}),
    "data.coco_stuff": (["-m", "segvit_jax.data.coco_stuff"], ("symlink", "quiet"), {}),
    "data.cocostuff": (["-m", "segvit_jax.data.cocostuff"], ("symlink", "quiet"), {}),
    "data.synthetic": (["-m", "segvit_jax.data.synthetic"],
                       ("output", "split", "num", "size", "seed"), {}),
    "flops": (["-m", "segvit_jax.flops"], ("config", "size"), {}),
    "tools.plot": (["-m", "segvit_jax.tools.plot"], ("workdir", "keys", "output"), {}),
    "tools.browse": (["-m", "segvit_jax.tools.browse"],
                     ("config", "num", "cols", "min_side", "output"), {}),
    "tools.benchmark": (["-m", "segvit_jax.tools.benchmark"],
                        ("checkpoint", "config", "step", "size", "batch", "warmup", "iters",
                         "protocol", "json", "compilation_cache"), {}),
    "convert": (["-m", "segvit_jax.convert"],
                ("from", "to", "config", "image_size", "patch_size", "posemb_resize",
                 "patch_resize", "num_heads", "mean", "std", "trust_pickle", "backbone",
                 "delta_from", "overwrite"),
                {"image-size": "image_size", "patch-size": "patch_size",
                 "posemb-resize": "posemb_resize", "patch-resize": "patch_resize",
                 "num-heads": "num_heads", "trust-pickle": "trust_pickle"}),
}
HELP_SECONDS = 60  # imports only (measured: 2-3 s each on an idle core)
FLAG_LINE = re.compile(r"  --(?:\[no\])?(\w+)(?: \(alias ([^)]*)\))?: \S.*")


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
def test_help_lists_own_flags_and_exits_0(name):
  """--help (every other entry point -h: `runtime.run` treats the two alike, test_runtime.py)
  lists the entry point's own flags, one line each, and exits 0, with no warning on stderr
  (`python -m` of a module that `import segvit_jax` had already imported printed runpy's
  "found in sys.modules ... unpredictable behaviour")."""
  command, own, aliases = ENTRY_POINTS[name]
  arg = "-h" if list(ENTRY_POINTS).index(name) % 2 else "--help"
  t0 = time.perf_counter()
  proc = run(*command, arg, check=False)
  assert time.perf_counter() - t0 < HELP_SECONDS
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Warning" not in proc.stderr, proc.stderr[-3000:]
  lines = [line for line in proc.stdout.splitlines() if line.startswith("  --")]
  matches = [FLAG_LINE.fullmatch(line) for line in lines]
  assert all(matches), lines  # `--name: help (default: value)`, one line each
  assert [m.group(1) for m in matches] == list(own), proc.stdout  # no library's flags
  assert not any("grain" in line or "orbax" in line for line in lines)
  listed = {a.removeprefix("--"): m.group(1) for m in matches if m.group(2)
            for a in m.group(2).split(", ")}
  assert listed == aliases


@pytest.mark.parametrize("args, line", [
    (["predict.py", "--checkpoint", "runs/none", "--input", "/nonexistent/photo.jpg",
      "--output", "/tmp/out"], "error: FileNotFoundError: input /nonexistent/photo.jpg does not "
                               "exist"),
    (["eval.py", "--config", "configs/demo.py:smoke"], "error: give --workdir or --checkpoint"),
    (["-m", "segvit_jax.export_bundle", "--workdir", "runs/none"],
     "error: flag --output=None: Flag --output must have a value other than None."),
    (["-m", "segvit_jax.flops", "--config", "configs/demo.py", "--size", "12y"],
     "error: --size=12y: expected HxW or a side, e.g. 512x683 or 640"),
    (["-m", "segvit_jax.data.coco_stuff", "raw"],
     "error: expected RAW OUT: the unpacked cocostuff-10k release and the output directory"),
])
def test_a_users_mistake_is_one_line(args, line):
  proc = run(*args, check=False)
  assert proc.returncode == 1
  assert proc.stderr.splitlines()[-1] == line, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
