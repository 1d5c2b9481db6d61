"""Quiet and honest logs (issue 21, item 5): what the tools print, run as a user runs them.

- no "Unable to initialize backend 'tpu'" line where libtpu is not installed, no orbax INFO and
  no orbax warning about the data iterator's item ("Item 'data' was found in the checkpoint,
  but could not be restored"): every log line of train.py / export_bundle / eval.py comes from
  a file of this project;
- a finished run, rerun, says "already trained to step N (total_steps N): nothing to do" and
  returns before the dataset is read or anything is compiled;
- `eval.py --workdir W` without --config evaluates with W/config.json;
- a missing `config.model_init` fails before the dataset is read and before the workdir is
  written.
"""

from __future__ import annotations

import json
import logging as py_logging
import os
import re
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from segvit_jax import bundle, checkpoint, config_check, runtime, trainer
from segvit_jax.data import pipeline, registry
from tests.support import ROOT, cache_env, smoke_config

# absl's log line: "I1202 06:23:15.035249 140317087267712 trainer.py:673] message".
LOG_LINE = re.compile(r"^[IWEF]\d{4} [\d:.]+ +\d+ ([\w.]+):\d+\] (.*)$")
TPU_LINE = "Unable to initialize backend 'tpu'"
ITEM_DATA_LINE = 'Item "data" was found in the checkpoint'


def project_files() -> set[str]:
  """The file names of this project's Python files (the sources of its own log lines)."""
  names = {"train.py", "eval.py", "predict.py"}
  for folder, _, files in os.walk(os.path.join(ROOT, "segvit_jax")):
    names.update(f for f in files if f.endswith(".py"))
  return names


def log_lines(text: str) -> list[tuple[str, str]]:
  """(source file, message) of each absl log line in `text`."""
  return [m.groups() for m in map(LOG_LINE.match, text.splitlines()) if m]


def tool(*args: str) -> subprocess.CompletedProcess:
  """`python ARGS...` from the repository root as a user runs it: without JAX_PLATFORMS, so
  that jax tries every backend it knows (the TPU one too) as it does on a fresh machine."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  env.update(cache_env())
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                        env=env, timeout=600)


def foreign_lines(proc: subprocess.CompletedProcess) -> list[str]:
  """The log lines of `proc` that do not come from a file of this project."""
  ours = project_files()
  return [f"{src}] {msg}" for src, msg in log_lines(proc.stderr + proc.stdout)
          if src not in ours]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A finished smoke run (6 steps, checkpoints at 3 and 6), trained by train.py."""
  path = str(tmp_path_factory.mktemp("quiet") / "run")
  proc = tool("train.py", "--config", "configs/demo.py:smoke", "--workdir", path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return path, proc


def test_training_logs_only_project_lines(run_dir):
  _, proc = run_dir
  assert TPU_LINE not in proc.stderr
  assert foreign_lines(proc) == []
  messages = [msg for _, msg in log_lines(proc.stderr)]
  # INFO is on (the lines below are INFO), so the absence of orbax's INFO is the filter's doing.
  assert any(m.startswith("train step compiled in") for m in messages)
  assert any(m.startswith("step 6/6 |") for m in messages)


def test_library_filter_drops_only_the_chatter():
  def record(name, level, msg, path):
    return py_logging.LogRecord(name, level, path, 1, msg, None, None)

  jax_file = "/venv/site-packages/jax/_src/xla_bridge.py"
  orbax_file = "/venv/site-packages/orbax/checkpoint/checkpoint_manager.py"
  tpu = "Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so: ..."
  cuda = "Unable to initialize backend 'cuda': no supported devices found"
  quiet = runtime.LibraryFilter(("orbax", "grain"), hide_tpu_line=True)
  on_tpu_vm = runtime.LibraryFilter(("orbax", "grain"), hide_tpu_line=False)
  cases = [  # (record, kept by `quiet`, kept by `on_tpu_vm`)
      (record("jax._src.xla_bridge", py_logging.INFO, tpu, jax_file), False, True),
      (record("jax._src.xla_bridge", py_logging.INFO, cuda, jax_file), True, True),
      (record("jax._src.xla_bridge", py_logging.WARNING, tpu, jax_file), True, True),
      (record("absl", py_logging.INFO, "Saving checkpoint", orbax_file), False, False),
      (record("absl", py_logging.WARNING, "read only", orbax_file), True, True),
      (record("absl", py_logging.INFO, "step 6/6", "/repo/segvit_jax/trainer.py"), True, True),
  ]
  assert [quiet.filter(r) for r, _, _ in cases] == [k for _, k, _ in cases]
  assert [on_tpu_vm.filter(r) for r, _, _ in cases] == [k for _, _, k in cases]
  assert runtime.libtpu_installed() is False  # this machine (and CI): no TPU runtime


def test_export_bundle_prints_no_log_line(run_dir, tmp_path):
  path, _ = run_dir
  out = str(tmp_path / "bundle")
  proc = tool("-m", "segvit_jax.export_bundle", "--workdir", path, "--output", out)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert log_lines(proc.stderr) == []  # not one line: no orbax INFO, warning, nor TPU line
  assert proc.stdout.strip() == f"wrote bundle {out} (step 6)"


def test_restore_params_reads_the_state_item_without_warnings(run_dir, caplog):
  """restore_params reads only the train state: the data iterator's item next to it is not an
  error (orbax's manager, opened with the state handler alone, warned about it), and the
  parameters are the checkpoint's, bit for bit (max abs difference 0 against orbax's own
  reader of the whole item)."""
  path, _ = run_dir
  ckpt_dir = os.path.join(path, "checkpoints")
  caplog.set_level(py_logging.DEBUG)
  params, step = checkpoint.restore_params(ckpt_dir)
  assert step == 6
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= py_logging.WARNING]
  assert warnings == []
  import orbax.checkpoint as ocp  # the reference: orbax's checkpointer of the item folder
  reference = ocp.StandardCheckpointer().restore(os.path.join(ckpt_dir, "6", "state"))
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                       params, reference["params"])
  assert max(jax.tree.leaves(diffs)) == 0.0
  assert checkpoint.restore_params(ckpt_dir, 3)[1] == 3


def test_rerun_of_a_finished_run_does_nothing(run_dir):
  path, _ = run_dir
  before = {n: os.path.getmtime(os.path.join(path, n)) for n in ("config.json", "metrics.jsonl")}
  proc = tool("train.py", "--config", "configs/demo.py:smoke", "--workdir", path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert [msg for _, msg in log_lines(proc.stderr)] == [
      "already trained to step 6 (total_steps 6): nothing to do"]
  assert "compiled" not in proc.stderr and "resumed" not in proc.stderr
  after = {n: os.path.getmtime(os.path.join(path, n)) for n in before}
  assert after == before  # nothing rewritten


def test_rerun_returns_before_the_data_and_the_compile(run_dir, monkeypatch):
  path, _ = run_dir

  def forbidden(*_, **__):
    raise AssertionError("a finished run read its dataset")

  monkeypatch.setattr(registry, "get_source", forbidden)
  monkeypatch.setattr(pipeline, "make_train_iterator", forbidden)
  monkeypatch.setattr(jax, "jit", forbidden)
  t0 = time.perf_counter()
  assert trainer.train(smoke_config(), path) == {}
  elapsed = time.perf_counter() - t0
  assert elapsed < 1.0, f"{elapsed:.2f} s"  # measured: about 0.01 s (the compile alone is 3 s+)


def test_trained_to_skips_what_a_resume_skips(tmp_path):
  """The newest step a resume would restore: a damaged newer step (its state/_METADATA not
  JSON), a step set aside and an unfinished save do not count."""
  def step(name, metadata):
    os.makedirs(tmp_path / name / "state")
    with open(tmp_path / name / "state" / "_METADATA", "w") as f:
      f.write(metadata)

  assert trainer.trained_to(str(tmp_path / "none")) is None
  step("3", "{}")
  step("6", "{trunc")
  step("9.damaged", "{}")
  step("12.orbax-checkpoint-tmp-1", "{}")
  assert checkpoint.saved_steps(str(tmp_path)) == [3, 6]
  assert trainer.trained_to(str(tmp_path)) == 3


def test_eval_workdir_without_config_reads_the_saved_config(run_dir, tmp_path):
  path, _ = run_dir
  out = str(tmp_path / "eval")
  proc = tool("eval.py", "--workdir", path, "--output", out, "--num_vis", "0")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert foreign_lines(proc) == []
  with open(os.path.join(out, "eval_results.json")) as f:
    evaluated = json.load(f)["evaluated"]
  with open(os.path.join(path, "config.json")) as f:
    saved = json.load(f)
  assert evaluated["config_file"] == os.path.join(path, "config.json")
  assert evaluated["step"] == 6
  assert evaluated["config"]["dataset"] == saved["dataset"]
  assert evaluated["config"]["eval"] == saved["eval"]
  assert "mIoU:" in proc.stdout


def test_eval_bundle_without_config_is_one_line(run_dir, tmp_path):
  path, _ = run_dir
  params, _ = checkpoint.restore_params(os.path.join(path, "checkpoints"))
  config = smoke_config()
  out = bundle.save_bundle(str(tmp_path / "b"), params, config.model, mean=config.mean,
                           std=config.std, class_names=[f"c{i}" for i in
                                                        range(config.model.num_classes)])
  proc = tool("eval.py", "--checkpoint", out)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
      f"error: give --config: {out} holds no training config.json (a workdir of train.py has "
      "one; a bundle's config describes the model only, not the dataset to evaluate on)"]


def test_missing_model_init_fails_before_the_data_and_the_workdir(tmp_path, monkeypatch):
  def forbidden(*_, **__):
    raise AssertionError("the dataset was read before model_init was checked")

  monkeypatch.setattr(registry, "get_source", forbidden)
  missing, workdir = str(tmp_path / "nope.npz"), str(tmp_path / "run")
  config = smoke_config(model_init=missing, model_init_format="augreg-npz")
  t0 = time.perf_counter()
  with pytest.raises(config_check.ConfigError) as e:
    trainer.train(config, workdir)
  assert time.perf_counter() - t0 < 1.0
  assert str(e.value) == (
      f"config.model_init={missing!r}: model_init {missing} does not exist. Download the "
      "checkpoint (README, 'Pretrained weights') or pass --config.model_init='' to train from "
      "scratch.")
  assert not os.path.exists(workdir)  # nothing written, not even the folder
  # A resumed run starts from its checkpoint: model_init is not read, so not required.
  assert config_check.init_problems(config, resumes=True) == []
  assert config_check.init_problems(smoke_config(), resumes=False) == []  # model_init ''
