"""Faults of what a user gives the tools (issue 20, defects 5-8): settings that trained
silently or failed late, results written over, user errors printed as tracebacks, and the
messages of a bad training example."""

from __future__ import annotations

import glob
import importlib
import os
import re

import flax
import jax
import numpy as np
import pytest

from segvit_jax import bundle as bundle_lib
from segvit_jax import config_check, trainer
from segvit_jax.convert import __main__ as convert_cli
from segvit_jax.data import registry, synthetic
from segvit_jax.models import build_model
from tests.support import run, smoke_config

# ---------------------------------------------------------------------------------------------
# 5. Settings are checked before anything is written or compiled.

INVALID = [  # (key, value, what the message says is allowed)
    ("optim.lr", -1e-3, "a finite number > 0"),
    ("optim.lr", 0.0, "a finite number > 0"),
    ("optim.lr", float("nan"), "a finite number > 0"),
    ("ckpt_every", 0, "an integer >= 1 (a checkpoint is always written after the last step"),
    ("log_every", 0, "an integer >= 1 (the last step is always logged"),
    ("total_steps", 0, "an integer >= 1"),
    ("eval_every", -1, "0 (no evaluation during training) or an integer >= 1"),
    ("keep_ckpts", 0, "an integer >= 1"),
    ("optim.b2", 1.0, "in [0, 1)"),
    ("optim.weight_decay", -0.01, "a finite number >= 0"),
    ("optim.warmup_ratio", 2.0, "in [0, 1]"),
    ("optim.schedule", "cosine", "one of 'warmup_poly', 'two_stage'"),
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


def _never_called(*args):
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
  args = ["", "smoke"] + (["eomt"] if name == "demo" else [])
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
      "error: ConfigError: config.optim.lr=-0.001 must be a finite number > 0 (the peak "
      "learning rate; a negative one makes the loss grow)")
  assert "Traceback" not in proc.stderr
  assert not workdir.exists()


# ---------------------------------------------------------------------------------------------
# 6. Results are not written over by mistake, and a bundle is replaced atomically.


@pytest.fixture(scope="module")
def smoke_params():
  """The smoke model's freshly initialised parameters (the SegViT of configs/demo.py:smoke)."""
  c = smoke_config()
  model = build_model(c.model)
  variables = model.init(jax.random.key(0), bundle_lib.probe_input(c.model))
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
