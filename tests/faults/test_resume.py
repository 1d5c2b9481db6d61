"""Resuming from damaged checkpoints and with a changed config (issue 20, defects 3 and 4).

One real tiny run (3 steps, a checkpoint after each) is copied and damaged the ways a killed
run, a full disk or a bad copy leave a checkpoint: a truncated data-iterator JSON, a missing
`state/_METADATA`, a missing `state/` item, an empty step folder, truncated array files, a
leftover temporary folder of an unfinished save. Resume takes the newest intact step, warns
naming the damaged one and why, and keeps it (moved aside, never deleted). A config that
changes the model or the classes is refused before anything is written to the workdir; a
legal change (total_steps) is logged and the run resumes.
"""

import glob
import json
import logging
import os
import re
import shutil

import jax
import numpy as np
import pytest

from segvit_jax import checkpoint, trainer
from segvit_jax.data import pipeline
from tests.support import flat_params, read_metrics, run, smoke_config

RUN = dict(total_steps=3, ckpt_every=1, keep_ckpts=5)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A finished 3-step smoke run with checkpoints 1, 2 and 3."""
  workdir = str(tmp_path_factory.mktemp("run") / "w")
  trainer.train(smoke_config(**RUN), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2", "3"]
  return workdir


@pytest.fixture
def workdir(run_dir, tmp_path):
  """A fresh copy of the run, to damage."""
  dst = str(tmp_path / "w")
  shutil.copytree(run_dir, dst)
  return dst


@pytest.fixture
def absl_log(caplog):
  caplog.set_level(logging.INFO, logger="absl")
  return caplog


def truncate_data_json(step_dir):
  path = os.path.join(step_dir, "data", "process_0-of-1.json")
  with open(path, "w") as f:
    f.write('{\n    "next_')


def remove_metadata(step_dir):
  os.remove(os.path.join(step_dir, "state", "_METADATA"))


def remove_state(step_dir):
  shutil.rmtree(os.path.join(step_dir, "state"))


def empty_folder(step_dir):
  shutil.rmtree(step_dir)
  os.makedirs(step_dir)


def truncate_arrays(step_dir):  # found only when orbax reads the arrays
  for path in glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")):
    with open(path, "r+b") as f:
      f.truncate(10)


# (damage, a regular expression of the reason the warning gives)
DAMAGES = {
    "truncated_data_json": (truncate_data_json, re.escape(
        "data/process_0-of-1.json is not valid JSON (Unterminated string starting at: line 2 "
        "column 5 (char 6))")),
    "missing_metadata": (remove_metadata, re.escape("state/_METADATA is missing")),
    "missing_state": (remove_state, re.escape("it has no state/ item (the train state)")),
    "empty_step_folder": (empty_folder, re.escape("the step folder is empty")),
    # Which array's read fails first varies (they are read concurrently).
    "truncated_arrays": (truncate_arrays, (
        r"Exception: Encountered error while reading array index: \(.*\)\. \(ValueError: "
        r'OUT_OF_RANGE: Error reading "[\w.]+/[\d.]+" in OCDBT database at local file '
        r'"[^"]+/3/state/": Requested byte range \[\d+, \d+\) is not valid for value of '
        r"size 10\)")),
}


def abstract_state(ckpt, step):
  """The saved train state's shapes, on this host's device (the trainer's TrainState target
  is the same tree)."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                      ckpt.manager.item_metadata(step)["state"])


def restore_newest(directory, run_dir):
  """(state, step, data iterator) of `Checkpointer.restore_newest` on `directory`, restoring
  the data iterator too, as training does; the target is the train state of `run_dir`."""
  source = checkpoint.Checkpointer(os.path.join(run_dir, "checkpoints"))
  target = abstract_state(source, 1)
  source.close()
  ckpt = checkpoint.Checkpointer(directory, keep=5)
  data_iter = pipeline.make_train_iterator(smoke_config(**RUN))
  try:
    state, step = ckpt.restore_newest(lambda s: ckpt.restore(target, data_iter, step=s))
  finally:
    ckpt.close()
  return state, step, data_iter


def listing(path):
  return sorted(os.path.relpath(p, path) for p in glob.glob(os.path.join(path, "**"),
                                                            recursive=True))


@pytest.mark.parametrize("case", sorted(DAMAGES))
def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(run_dir, workdir, absl_log,
                                                                  case):
  damage, reason = DAMAGES[case]
  ckpts = os.path.join(workdir, "checkpoints")
  damage(os.path.join(ckpts, "3"))
  files = listing(os.path.join(ckpts, "3"))
  state, step, data_iter = restore_newest(ckpts, run_dir)
  assert step == 2 and int(state["step"]) == 2
  assert data_iter.get_state()["next_index"] == 2  # the iterator is where step 2 left it
  warnings = [r.getMessage() for r in absl_log.records if r.levelno == logging.WARNING]
  damaged = [w for w in warnings if "is damaged" in w]
  assert len(damaged) == 1, warnings
  assert re.fullmatch(f"checkpoint 3 at {re.escape(ckpts)}/3 is damaged \\({reason}\\): "
                      "trying the one before it", damaged[0]), damaged[0]
  assert "\n" not in damaged[0]
  # Kept, moved aside where orbax neither lists nor deletes it, with every file it had.
  assert sorted(os.listdir(ckpts)) == ["1", "2", "3.damaged"]
  assert listing(os.path.join(ckpts, "3.damaged")) == files
  assert any(f"moved damaged checkpoint 3 aside to {ckpts}/3.damaged" in w for w in warnings)
  # The restored parameters are step 2's, exactly.
  params = jax.tree_util.tree_leaves_with_path(state["params"])
  saved = flat_params(workdir, 2)
  assert len(params) == len(saved)
  for path, value in params:
    np.testing.assert_array_equal(np.asarray(value), saved[jax.tree_util.keystr(path)])


def test_an_empty_newer_step_folder_is_skipped(run_dir, workdir, absl_log):
  ckpts = os.path.join(workdir, "checkpoints")
  os.makedirs(os.path.join(ckpts, "4"))  # orbax lists it as the latest step
  _, step, _ = restore_newest(ckpts, run_dir)
  assert step == 3
  assert f"checkpoint 4 at {ckpts}/4 is damaged (the step folder is empty)" in absl_log.text
  assert sorted(os.listdir(ckpts)) == ["1", "2", "3", "4.damaged"]


def test_a_leftover_temporary_folder_is_named_and_left_alone(run_dir, workdir, absl_log):
  ckpts = os.path.join(workdir, "checkpoints")
  tmp = os.path.join(ckpts, "4.orbax-checkpoint-tmp-1796178166")
  shutil.copytree(os.path.join(ckpts, "3"), tmp)
  remove_state(tmp)  # killed half-way through the save
  _, step, _ = restore_newest(ckpts, run_dir)
  assert step == 3
  assert (f"{tmp} is a save that never finished (the run stopped while writing it): not a "
          "checkpoint, ignored and left in place") in absl_log.text
  assert "is damaged" not in absl_log.text
  assert sorted(os.listdir(ckpts)) == ["1", "2", "3", os.path.basename(tmp)]


def test_no_intact_checkpoint_is_one_error_naming_each(run_dir, workdir):
  ckpts = os.path.join(workdir, "checkpoints")
  truncate_data_json(os.path.join(ckpts, "3"))
  remove_metadata(os.path.join(ckpts, "2"))
  empty_folder(os.path.join(ckpts, "1"))
  with pytest.raises(checkpoint.NoIntactCheckpointError) as e:
    restore_newest(ckpts, run_dir)
  message = str(e.value)
  assert message.startswith(f"no intact checkpoint in {ckpts}: step 3: data/process_0-of-1.json "
                            "is not valid JSON"), message
  assert "; step 2: state/_METADATA is missing; step 1: the step folder is empty." in message
  assert sorted(os.listdir(ckpts)) == ["1", "2", "3"]  # nothing moved, nothing deleted


@pytest.mark.parametrize("case", ["missing_metadata", "missing_state", "truncated_arrays"])
def test_loading_a_workdir_reads_the_newest_intact_checkpoint(workdir, absl_log, case):
  """eval.py / predict.py / export_bundle on a workdir (`load_model`): a damaged newest step
  is skipped with the same warning and the one before it is read; nothing is moved (they only
  read). A damaged step asked for by number is one error naming it."""
  damage, reason = DAMAGES[case]
  ckpts = os.path.join(workdir, "checkpoints")
  damage(os.path.join(ckpts, "3"))
  model = checkpoint.load_model(workdir)
  assert model.config.step == 2
  saved = flat_params(workdir, 2)
  got = jax.tree_util.tree_leaves_with_path(model.variables["params"])
  assert len(got) == len(saved)
  for path, value in got:
    np.testing.assert_array_equal(np.asarray(value), saved[jax.tree_util.keystr(path)])
  damaged = [r.getMessage() for r in absl_log.records if "is damaged" in r.getMessage()]
  assert len(damaged) == 1 and re.fullmatch(
      f"checkpoint 3 at {re.escape(ckpts)}/3 is damaged \\({reason}\\): reading the one "
      "before it", damaged[0]), damaged
  assert sorted(os.listdir(ckpts)) == ["1", "2", "3"]
  with pytest.raises(checkpoint.DamagedCheckpointError,
                     match=f"checkpoint 3 at {re.escape(ckpts)}/3 is damaged: "):
    checkpoint.load_model(workdir, step=3)
  for step in ("1", "2"):
    empty_folder(os.path.join(ckpts, step))
  with pytest.raises(checkpoint.NoIntactCheckpointError,
                     match=f"no intact checkpoint in {re.escape(ckpts)}: step 3: .*; step 2: "
                     "the step folder is empty; step 1: the step folder is empty"):
    checkpoint.load_model(workdir)


def test_a_damaged_step_is_one_warning_line_on_stderr(workdir):
  """What a terminal shows when the newest step's arrays are damaged: orbax's read fails at
  the first bad array and abandons the others, whose errors it used to report again on
  stderr ("Event loop is closed", "Task exception was never retrieved": 19,671 lines here);
  now the one warning naming the step is all."""
  truncate_arrays(os.path.join(workdir, "checkpoints", "3"))
  proc = run("-c", "import sys; from segvit_jax import checkpoint; "
             "print(checkpoint.load_model(sys.argv[1]).config.step)", workdir)
  assert proc.stdout.split() == ["2"]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and "checkpoint 3 at" in lines[0] and "is damaged" in lines[0], (
      proc.stderr[-3000:])


def test_a_saved_tree_of_other_shapes_is_a_mismatch_not_damage(workdir):
  """The check behind the config comparison (a workdir without config.json): names the
  parameter and both shapes, and tries no older step."""
  ckpts = os.path.join(workdir, "checkpoints")
  ckpt = checkpoint.Checkpointer(ckpts)
  target = abstract_state(ckpt, 3)
  kernel = target["params"]["backbone"]["embedding"]["kernel"]
  target["params"]["backbone"]["embedding"]["kernel"] = jax.ShapeDtypeStruct(
      (*kernel.shape[:-1], 64), kernel.dtype, sharding=kernel.sharding)
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r"checkpoint 3 at .*/3 does not fit this run's train state \(saved -> "
                     r"this run\): params/backbone/embedding/kernel: \(8, 8, 3, 32\) -> "
                     r"\(8, 8, 3, 64\)\. It was written with another model"):
    ckpt.restore_newest(lambda s: ckpt.restore(target, step=s))
  ckpt.close()
  assert sorted(os.listdir(ckpts)) == ["1", "2", "3"]


def test_resume_continues_from_the_intact_step_and_logs_a_legal_change(workdir, absl_log):
  ckpts = os.path.join(workdir, "checkpoints")
  truncate_data_json(os.path.join(ckpts, "3"))
  trainer.train(smoke_config(**{**RUN, "total_steps": 4}), workdir)
  text = absl_log.text
  assert f"checkpoint 3 at {ckpts}/3 is damaged (data/process_0-of-1.json" in text
  assert f"resumed from {ckpts} at step 2" in text
  assert (f"config changed since {workdir}/config.json was written (allowed on resume): "
          "total_steps: 3 -> 4") in text
  changes = [r for r in absl_log.records if "config changed since" in r.getMessage()]
  assert len(changes) == 1  # one line per changed key, and only total_steps changed
  assert sorted(os.listdir(ckpts)) == ["1", "2", "3", "3.damaged", "4"]
  # Steps 3 and 4 ran again from step 2: the new step 3 is a checkpoint like the old one.
  assert flat_params(workdir, 4).keys() == flat_params(workdir, 2).keys()
  assert read_metrics(workdir)[-1]["step"] == 4
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["total_steps"] == 4  # rewritten once the restore succeeded


@pytest.mark.parametrize("overrides, listed", [
    ({"model.backbone.width": 64}, ["model.backbone.width: 32 -> 64"]),
    ({"model.backbone.depth": 3}, ["model.backbone.depth: 2 -> 3"]),
    ({"model.num_classes": 5, "dataset.num_classes": 5},
     ["dataset.num_classes: 6 -> 5", "model.num_classes: 6 -> 5"]),
])
def test_a_changed_model_is_refused_and_the_workdir_untouched(workdir, overrides, listed):
  before = {name: open(os.path.join(workdir, name), "rb").read()
            for name in ("config.json", "classes.txt", "metrics.jsonl")}
  ckpt_files = listing(os.path.join(workdir, "checkpoints"))
  with pytest.raises(checkpoint.ResumeConfigError) as e:
    trainer.train(smoke_config(**RUN, **overrides), workdir)
  message = str(e.value)
  assert message.startswith(f"this config cannot resume the checkpoints in {workdir}/checkpoints: "
                            f"it changes keys they depend on (saved in {workdir}/config.json -> "
                            f"this run): {'; '.join(listed)}. Resume with the saved values")
  for name, data in before.items():
    with open(os.path.join(workdir, name), "rb") as f:
      assert f.read() == data, name  # byte-identical
  assert listing(os.path.join(workdir, "checkpoints")) == ckpt_files


def test_which_config_changes_a_checkpoint_survives():
  saved = json.loads(smoke_config().to_json_best_effort())
  new = smoke_config(**{"total_steps": 9, "log_every": 1, "ckpt_every": 2, "eval_every": 5,
                        "optim.lr": 2e-3, "optim.warmup_steps": 7, "batch_size": 2,
                        "model.backbone.scan_layers": True, "model.backbone.remat": True,
                        "model.dtype": "bfloat16", "model.backbone.drop_path": 0.1,
                        "optim.lr_mults": {"head": 10.0}, "optim.layer_decay": 0.9})
  fixed, free = checkpoint.config_changes(saved, json.loads(new.to_json_best_effort()))
  assert fixed == ["optim.layer_decay: null -> 0.9", "optim.lr_mults.head: 2.0 -> 10.0"]
  assert [line.split(":")[0] for line in free] == [
      "batch_size", "ckpt_every", "eval_every", "log_every", "model.backbone.drop_path",
      "model.backbone.remat", "model.backbone.scan_layers", "model.dtype", "optim.lr",
      "optim.warmup_steps", "total_steps"]


def test_a_config_saved_before_layer_decay_skip_last_resumes():
  """A run written before the key existed had no undecayed blocks (its default, 0)."""
  saved = json.loads(smoke_config().to_json_best_effort())
  del saved["optim"]["layer_decay_skip_last"]
  assert checkpoint.config_changes(saved, json.loads(smoke_config().to_json_best_effort())) == (
      [], [])
  new = smoke_config(**{"optim.layer_decay_skip_last": 2})
  assert checkpoint.config_changes(saved, json.loads(new.to_json_best_effort()))[0] == [
      "optim.layer_decay_skip_last: 0 -> 2"]
