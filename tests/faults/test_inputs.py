"""Faults of what a user gives the tools (issue 20, defects 5-8): settings that trained
silently or failed late, results written over, user errors printed as tracebacks, and the
messages of a bad training example."""

from __future__ import annotations

import argparse
import glob
import importlib
import os
import re

import flax
import jax
import numpy as np
import pytest
from PIL import Image

from segvit_jax import bundle as bundle_lib
from segvit_jax import config_check, trainer
from segvit_jax.convert import __main__ as convert_cli
from segvit_jax.convert import rules
from segvit_jax.data import folder, registry, synthetic
from segvit_jax.models import build_model
from tests.support import run, smoke_config

# ---------------------------------------------------------------------------------------------
# 5. Settings are checked before anything is written or compiled.

INVALID = [  # (key, value, what the message says is allowed)
    ("optim.lr", -1e-3, "a finite number >= 0"),
    ("optim.lr", float("nan"), "a finite number >= 0"),
    ("ckpt_every", 0, "an integer >= 1 (a checkpoint is always written after the last step"),
    ("log_every", 0, "an integer >= 1 (the last step is always logged"),
    ("total_steps", 0, "an integer >= 1"),
    ("eval_every", -1, "0 (no evaluation during training) or an integer >= 1"),
    ("keep_ckpts", 0, "an integer >= 1"),
    ("optim.b2", 1.0, "in [0, 1)"),
    ("optim.weight_decay", -0.01, "a finite number >= 0"),
    ("optim.warmup_ratio", 2.0, "in [0, 1]"),
    ("optim.schedule", "cosine", "one of 'warmup_poly', 'two_stage'"),
    ("optim.layer_decay_skip_last", -1,
     "an integer >= 0 (the last blocks without layer-wise decay)"),
    ("dataset.num_workers", -1, "an integer >= 0"),
    ("eval.max_examples", 0, "-1 (the whole split) or an integer >= 1"),
]


@pytest.mark.parametrize("key,value,allowed", INVALID, ids=[f"{k}={v}" for k, v, _ in INVALID])
def test_invalid_setting_fails_first_naming_key_value_and_rule(tmp_path, key, value, allowed):
  workdir = tmp_path / "run"
  with pytest.raises(config_check.ConfigError) as e:
    trainer.train(smoke_config(**{key: value}), str(workdir))
  assert str(e.value).startswith(f"config.{key}={value!r} must be {allowed}"), str(e.value)
  assert "\n" not in str(e.value)  # one problem, one line
  assert not workdir.exists()  # nothing written, nothing compiled


def test_several_invalid_settings_are_listed_together(tmp_path):
  c = smoke_config(**{"optim.lr": -1.0, "log_every": 0, "optim.lr_mults": {"head": -10.0}})
  with pytest.raises(config_check.ConfigError) as e:
    trainer.train(c, str(tmp_path / "run"))
  lines = str(e.value).splitlines()
  assert lines[0] == "3 invalid settings:"
  assert [l.split(" must")[0].strip() for l in lines[1:]] == [
      "config.log_every=0", "config.optim.lr=-1.0", "config.optim.lr_mults.head=-10.0"]


def test_min_lr_above_lr(tmp_path):
  with pytest.raises(config_check.ConfigError,
                     match=re.escape("config.optim.min_lr=0.5 must be in [0, optim.lr=0.001]")):
    trainer.train(smoke_config(**{"optim.lr": 1e-3, "optim.min_lr": 0.5}), str(tmp_path))


def test_model_classes_must_match_the_dataset(tmp_path):
  c = smoke_config(**{"model.num_classes": 7})
  with pytest.raises(config_check.ConfigError, match=re.escape(
      "config.model.num_classes=7 must be the 6 classes of dataset 'synthetic' "
      "(config.dataset.num_classes=6)")):
    trainer.train(c, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
  # With dataset.num_classes unset, the registry's class list (synthetic: 6 names) decides.
  c = smoke_config(**{"model.num_classes": 5, "dataset.num_classes": None})
  with pytest.raises(config_check.ConfigError, match=re.escape(
      "config.model.num_classes=5 must be the 6 classes of dataset 'synthetic' "
      "(config.dataset.num_classes=None)")):
    trainer.train(c, str(tmp_path / "run"))


def _never_called(*args, **kwargs):
  raise AssertionError("evaluated")


def test_empty_evaluation_split_fails_at_the_start(tmp_path, monkeypatch):
  # A split that builds but holds nothing (a dataset of the registry with an empty list).
  empty = type("Empty", (), {"class_names": synthetic.CLASS_NAMES, "__len__": lambda self: 0})
  real = registry.DATASETS["synthetic"]
  monkeypatch.setitem(registry.DATASETS, "synthetic", lambda cfg, split: (
      empty() if split == cfg.eval_split else real(cfg, split)))
  c = smoke_config(eval_every=2)
  with pytest.raises(config_check.ConfigError, match=re.escape(
      "config.dataset.eval_split='val' of dataset 'synthetic' has no examples, and "
      "config.eval_every=2 evaluates it during training")):
    trainer.train(c, str(tmp_path / "run"), evaluate_fn=_never_called)
  assert not (tmp_path / "run").exists()
  # Without an evaluation (eval_every 0, or no evaluate_fn) the empty split is no error.
  for c, fn in ((smoke_config(eval_every=0), _never_called), (smoke_config(eval_every=2), None)):
    config_check.check(c, evaluates=fn is not None)


def test_synthetic_split_sizes(tmp_path):
  with pytest.raises(config_check.ConfigError, match=re.escape(
      "config.dataset.num_eval=0 must be an integer >= 1 (examples of the synthetic split)")):
    trainer.train(smoke_config(**{"dataset.num_eval": 0}), str(tmp_path / "run"))


def test_a_folder_without_evaluation_images_fails_at_the_start(tmp_path):
  root = tmp_path / "data"
  synthetic.write_folder(str(root), "train", 4, 32)
  os.makedirs(root / "images" / "val")
  os.makedirs(root / "annotations" / "val")
  c = smoke_config(eval_every=2, **{"dataset.name": "folder", "dataset.root": str(root)})
  with pytest.raises(FileNotFoundError, match=re.escape(f"no images (.jpg, .jpeg, .png) in "
                                                        f"{root}/images/val")):
    trainer.train(c, str(tmp_path / "run"), evaluate_fn=_never_called)
  assert not (tmp_path / "run").exists()


def _configs():
  for path in sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "configs",
                                            "*.py"))):
    name = os.path.basename(path)[:-3]
    if name not in ("common", "__init__"):
      yield name


@pytest.mark.parametrize("name", list(_configs()))
def test_every_shipped_config_passes(name):
  module = importlib.import_module(f"configs.{name}")
  args = ["", "smoke"] + (["eomt"] if name == "demo" else []) + (
      ["2x"] if name in ("eomt_vit_s_coco_panoptic", "eomt_vit_b_coco_panoptic") else [])
  for arg in args:
    c = module.get_config(arg)
    assert config_check.settings_problems(c) == [], (name, arg)
    assert c.model.num_classes == config_check.dataset_class_count(c.dataset), (name, arg)


def test_cli_invalid_setting_one_line_exit_1(tmp_path):
  workdir = tmp_path / "run"
  proc = run("train.py", "--config", "configs/demo.py:smoke", "--workdir", str(workdir),
             "--config.optim.lr=-0.001", check=False)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: ConfigError: config.optim.lr=-0.001 must be a finite number >= 0 (the peak "
      "learning rate; 0 leaves the parameters as they are, a negative one makes the loss "
      "grow)")
  assert "Traceback" not in proc.stderr
  assert not workdir.exists()


# ---------------------------------------------------------------------------------------------
# 6. Results are not written over by mistake, and a bundle is replaced atomically.


@pytest.fixture(scope="module")
def smoke_params():
  """The smoke model's freshly initialised parameters (the SegViT of configs/demo.py:smoke)."""
  c = smoke_config()
  model = build_model(c.model)
  variables = jax.jit(model.init)(jax.random.key(0), bundle_lib.probe_input(c.model))
  return c, flax.linen.meta.unbox(variables)["params"]


def _save(path, params, config, **extra):
  return bundle_lib.save_bundle(str(path), params, config.model, mean=config.mean,
                                std=config.std, class_names=synthetic.CLASS_NAMES, **extra)


def _tree_equal(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                   strict=True))


def _convert(*args) -> int:
  return convert_cli.cli([str(a) for a in args])


def test_convert_refuses_an_existing_output(smoke_params, tmp_path, capsys):
  c, params = smoke_params
  trained = _save(tmp_path / "trained", params, c, step=1234)
  before = open(os.path.join(trained, "config.json")).read()
  pth = tmp_path / "model.pth"
  assert _convert(trained, pth, "--to", "segvit-official") == 0
  # A .pth and a bundle that exist: refused, one line naming the path, nothing touched.
  pth_bytes = pth.read_bytes()
  capsys.readouterr()
  assert _convert(trained, pth, "--to", "segvit-official") == 1
  assert capsys.readouterr().err == (f"error: {pth} exists (a file): pass --overwrite to "
                                     "replace it\n")
  assert _convert(pth, trained, "--from", "segvit-official", "--config",
                  "configs/demo.py:smoke") == 1
  assert capsys.readouterr().err == (
      f"error: {trained} exists (a directory with a config.json (a bundle or a training "
      "workdir)): pass --overwrite to replace it\n")
  assert open(os.path.join(trained, "config.json")).read() == before
  assert pth.read_bytes() == pth_bytes
  # --overwrite replaces: the converted bundle holds the same parameters, no step any more.
  assert _convert(pth, trained, "--from", "segvit-official", "--config",
                  "configs/demo.py:smoke", "--overwrite") == 0
  assert "step" not in bundle_lib.read_config(trained)
  assert _tree_equal(bundle_lib.load_params(trained), params)
  assert sorted(os.listdir(tmp_path)) == ["model.pth", "trained"]  # no .tmp / .old left
  # An empty directory is no result: written without --overwrite.
  os.makedirs(tmp_path / "empty")
  assert _convert(pth, tmp_path / "empty", "--from", "segvit-official", "--config",
                  "configs/demo.py:smoke") == 0


def test_export_bundle_refuses_an_existing_output(smoke_params, tmp_path):
  c, params = smoke_params
  trained = _save(tmp_path / "bundle", params, c, step=99)
  before = open(os.path.join(trained, "config.json")).read()
  proc = run("-m", "segvit_jax.export_bundle", "--workdir", str(tmp_path / "no_run"),
             "--output", trained, check=False)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
      f"error: {trained} exists (a directory with a config.json (a bundle or a training "
      "workdir)): pass --overwrite to replace it"]
  assert open(os.path.join(trained, "config.json")).read() == before


def test_save_bundle_is_atomic(smoke_params, tmp_path, monkeypatch):
  c, params = smoke_params
  path = _save(tmp_path / "b", params, c, step=1)
  before = open(os.path.join(path, "config.json")).read()
  # A write that fails half-way (after the parameters, at config.json: a full disk) leaves
  # the old bundle whole and no temporary directory.
  other = jax.tree.map(lambda x: x + 1.0, params)

  def full_disk(*args, **kwargs):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(bundle_lib.json, "dump", full_disk)
  with pytest.raises(OSError, match="No space left on device"):
    _save(path, other, c, step=2)
  monkeypatch.undo()
  assert sorted(os.listdir(tmp_path)) == ["b"]
  assert open(os.path.join(path, "config.json")).read() == before
  assert _tree_equal(bundle_lib.load_params(path), params)
  # What a killed write leaves (b.tmp/, half written) goes with the next write.
  os.makedirs(tmp_path / "b.tmp" / "params")
  _save(path, other, c, step=2)
  assert sorted(os.listdir(tmp_path)) == ["b"]
  assert bundle_lib.read_config(path)["step"] == 2
  assert _tree_equal(bundle_lib.load_params(path), other)


# ---------------------------------------------------------------------------------------------
# 7. A user's error is one line naming the file; corrupt files are called corrupt.


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
  """Files as users meet them: a genuine .pth, one pickling an object, truncated and random
  ones, a truncated .safetensors, a corrupt config.json, a config file with a syntax error."""
  import torch  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  d = tmp_path_factory.mktemp("bad")
  torch.save({"w": torch.ones(64, 64)}, d / "good.pth")
  data = (d / "good.pth").read_bytes()
  (d / "truncated.pth").write_bytes(data[:len(data) // 2])
  (d / "random.pth").write_bytes(np.random.RandomState(0).bytes(5000))
  torch.save({"w": torch.ones(2), "args": argparse.Namespace(lr=1)}, d / "object.pth")
  save_file({"w": np.ones((64, 64), np.float32)}, str(d / "good.safetensors"))
  data = (d / "good.safetensors").read_bytes()
  (d / "truncated.safetensors").write_bytes(data[:len(data) // 2])
  os.makedirs(d / "bundle")
  (d / "bundle" / "config.json").write_text('{"format": "segvit_jax.bundle", "model": ')
  (d / "bad_config.py").write_text("def get_config(:\n")
  return d


@pytest.mark.parametrize("name,reason", [
    ("truncated.pth", None),  # torch's reason depends on where the cut falls
    ("random.pth", "UnpicklingError: Unsupported operand 172"),
    ("truncated.safetensors", "SafetensorError: Error while deserializing header: incomplete "
                              "metadata, file not fully covered"),
])
def test_corrupt_weights_are_called_corrupt(bad_files, name, reason):
  path = str(bad_files / name)
  with pytest.raises(ValueError) as e:
    rules.read_torch_checkpoint(path)
  kind = ".safetensors file" if name.endswith(".safetensors") else "PyTorch checkpoint"
  start = f"{path} is not a readable {kind}: the file is corrupt or truncated ("
  if reason is None:
    assert str(e.value).startswith(start), str(e.value)
  else:
    assert str(e.value) == f"{start}{reason}); download or write it again"
  assert "trust-pickle" not in str(e.value)


def test_a_pickled_object_still_asks_for_trust_pickle(bad_files):
  path = str(bad_files / "object.pth")
  with pytest.raises(ValueError, match=re.escape(
      f"{path} holds pickled Python objects besides tensors (argparse.Namespace)")):
    rules.read_torch_checkpoint(path)
  tensors, _ = rules.read_torch_checkpoint(path, trust_pickle=True)
  assert list(tensors) == ["w"]


def _one_error_line(proc) -> str:
  assert proc.returncode == 1, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  return lines[0]


def test_cli_user_errors_are_one_line_naming_the_file(bad_files, tmp_path):
  d = bad_files
  # A config file that does not parse, one that does not exist.
  assert _one_error_line(run("train.py", "--config", str(d / "bad_config.py"), "--workdir",
                             str(tmp_path / "w"), check=False)) == (
      f"error: cannot load config file {d}/bad_config.py: SyntaxError: invalid syntax "
      "(bad_config.py, line 1)")
  assert _one_error_line(run("train.py", "--config", str(d / "none.py"), "--workdir",
                             str(tmp_path / "w"), check=False)) == (
      f"error: cannot load config file --config={d}/none.py: [Errno 2] No such file or "
      f"directory: '{d}/none.py'")
  # A corrupt config.json; truncated weights given to the converter.
  assert _one_error_line(run("-m", "segvit_jax.convert", str(d / "bundle"), str(tmp_path / "o"),
                             "--to", "segvit-official", check=False)) == (
      f"error: ValueError: {d}/bundle/config.json is not valid JSON, the file is corrupt or "
      "truncated: Expecting value: line 1 column 42 (char 41)")
  line = _one_error_line(run("-m", "segvit_jax.convert", str(d / "truncated.pth"),
                             str(tmp_path / "o"), "--from", "dinov2", check=False))
  assert line.startswith(f"error: ValueError: {d}/truncated.pth is not a readable PyTorch "
                         "checkpoint: the file is corrupt or truncated")
  assert not (tmp_path / "o").exists() and not (tmp_path / "w").exists()


def test_traceback_on_request(bad_files, tmp_path, monkeypatch):
  monkeypatch.setenv("SEGVIT_JAX_TRACEBACK", "1")
  proc = run("train.py", "--config", str(bad_files / "bad_config.py"), "--workdir",
             str(tmp_path / "w"), check=False)
  assert proc.returncode == 1
  assert "Traceback (most recent call last)" in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("error: cannot load config file")
  monkeypatch.delenv("SEGVIT_JAX_TRACEBACK")
  # --verbosity=1 for an error after the flags are parsed.
  proc = run("-m", "segvit_jax.convert", str(bad_files / "random.pth"), str(tmp_path / "o"),
             "--from", "dinov2", "--verbosity=1", check=False)
  assert proc.returncode == 1
  assert "Traceback (most recent call last)" in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith(
      f"error: ValueError: {bad_files}/random.pth is not a readable PyTorch checkpoint")


# ---------------------------------------------------------------------------------------------
# 8. A bad label's message shows the file's value.


def folder_with_a_bad_label(root, num: int, index: int):
  """A synthetic folder dataset of `num` training examples whose label `index` holds 200 at
  its top-left pixel: (that label's path, its array)."""
  synthetic.write_folder(str(root), "train", num, 32)
  label = root / "annotations" / "train" / f"synthetic_train_{index:06d}.png"
  a = np.array(Image.open(label))
  a[0, 0] = 200
  Image.fromarray(a).save(label)
  return label, a


def test_out_of_range_label_shows_the_files_value(tmp_path):
  root = tmp_path / "data"
  label, a = folder_with_a_bad_label(root, 2, 0)
  # reduce_zero_label: the file's 1..6 are the 6 classes (its 0 -> ignored); 200 -> 199.
  a[a < 6] += 1
  Image.fromarray(a).save(label)
  source = folder.folder_source(str(root), "train", reduce_zero=True)
  with pytest.raises(ValueError) as e:
    source[0]
  assert str(e.value) == (f"label {label} has value(s) 200 (199 after reduce_zero_label) "
                          "outside the valid range 0..5 (ignore_index 255)")
  # Without a conversion the message is as before: the file's value.
  with pytest.raises(ValueError, match=re.escape(f"label {label} has value(s) 6, 200 outside")):
    folder.folder_source(str(root), "train")[0]


def test_a_bad_example_read_by_worker_processes_is_one_line(tmp_path):
  """With grain worker processes (num_workers=2) the bad example's error is the only line
  after the log: no leaked shared-memory warning and no grain AttributeError at exit (before:
  "There appear to be 6 leaked shared_memory objects" and `DatasetIterator.__del__` errors)."""
  root = tmp_path / "data"
  label, _ = folder_with_a_bad_label(root, 8, 3)
  proc = run("train.py", "--config", "configs/demo.py:smoke", "--workdir", str(tmp_path / "w"),
             "--config.dataset.name=folder", f"--config.dataset.root={root}",
             "--config.dataset.train_split=train", "--config.dataset.num_workers=2",
             "--config.eval_every=0", "--config.total_steps=20", check=False)
  assert proc.returncode == 1, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip() and not re.match(r"[IWE]\d{4} ", l)]
  assert lines == [f"error: ValueError: label {label} has value(s) 200 outside the valid range "
                   "0..5 (ignore_index 255)"], proc.stderr[-3000:]
