"""Faults during the train steps: a non-finite update is not applied and no checkpoint ever
holds a non-finite value (the run stops naming the step it resumes from); SIGTERM / SIGINT
save the current step and exit with 128 + the signal; a resumed run keeps each step's record
once in metrics.jsonl and hides the killed run's later steps from TensorBoard."""

import glob
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from segvit_jax import sharding, trainer
from tests.support import ROOT, cache_env, read_metrics, smoke_config

TIMING = ("steps_per_s", "images_per_s", "tflops", "mfu")
# A one-step warm-up from 0 (the smoke config's is 100 steps from 1e-6 x lr): step 1 leaves
# the parameters as they are whatever the lr. Every run here uses it, so that most share one
# compiled step.
KNOBS = {"optim.warmup_steps": 1, "optim.warmup_ratio": 0.0}
TOTAL = 12  # steps of every run: enough for train.py to be signalled mid-run


def saved_state(workdir, step):
  """The whole train state of checkpoint `step` (params, optimizer and model state), flat."""
  mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                               options=ocp.CheckpointManagerOptions(read_only=True),
                               item_handlers={"state": ocp.StandardCheckpointHandler()})
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        mngr.item_metadata(step)["state"])
  state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  mngr.close()
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(state["state"])}


def saved_steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def non_finite_values(workdir, step):
  """{key: count} of the non-finite floating-point values in checkpoint `step`."""
  out = {}
  for k, v in saved_state(workdir, step).items():
    if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all():
      out[k] = int((~np.isfinite(v)).sum())
  return out


def same_records(got, want):
  """metrics.jsonl records compared step by step, timing scalars left out."""
  strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs]  # noqa: E731
  assert [r["step"] for r in got] == [r["step"] for r in want]
  for a, b in zip(strip(got), strip(want)):
    assert a == b, (a, b)


# ---------------------------------------------------------------------------------------------
# Defect 1: the non-finite guard.

def test_keep_finite_keeps_the_whole_previous_state():
  old = trainer.TrainState(step=jnp.int32(4), params={"w": jnp.array([1.0, 2.0])},
                           opt_state=(jnp.int32(4), {"w": jnp.array([0.1, 0.2])}))
  new = old.replace(step=jnp.int32(5), params={"w": jnp.array([3.0, 4.0])})
  bad = new.replace(opt_state=(jnp.int32(5), {"w": jnp.array([jnp.inf, 0.2])}))
  one, nan, inf = jnp.float32(1.0), jnp.float32(jnp.nan), jnp.float32(jnp.inf)
  for candidate, loss, grad_norm, code in [(new, one, one, 0), (new, nan, one, 1),
                                           (new, one, inf, 2), (bad, one, one, 3),
                                           (bad, nan, inf, 1)]:
    state, got = jax.jit(trainer.keep_finite)(old, candidate, loss, grad_norm)
    assert int(got) == code
    want = candidate if code == 0 else old
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(want)):
      np.testing.assert_array_equal(a, b)  # max abs difference 0


def test_huge_lr_saves_no_non_finite_checkpoint_and_resumes_from_the_named_step(
    straight_run, tmp_path):
  # Step 1 leaves the parameters as they are (lr 0); step 2 scales the head's update by
  # 2 x 2.75e38 = inf while its loss, of the initial parameters, is finite. Before the guard
  # checked the update, checkpoint 2 held inf / nan values and every rerun from it met a NaN
  # loss at step 3, whatever the lr.
  c, straight = straight_run
  huge = smoke_config(total_steps=TOTAL, ckpt_every=1, log_every=1, **KNOBS,
                      **{"optim.lr": 3e38})
  with pytest.raises(trainer.NonFiniteLossError) as e:
    trainer.train(huge, str(tmp_path))
  message = str(e.value)
  assert re.match(r"non-finite parameters / optimizer state after the update \(loss \S+ and "
                  r"gradient norm \S+ finite\) at step 2: stopping; the update of step 2 was "
                  r"not applied\. The last good checkpoint \(1\) in \S+ holds only finite "
                  r"values: rerunning the same command resumes from step 1\. Before "
                  r"rerunning, lower optim\.lr \(now 3e\+38\) with --config\.optim\.lr=VALUE\.$",
                  message), message
  assert saved_steps(tmp_path) == [1]
  assert non_finite_values(tmp_path, 1) == {}
  assert [m["step"] for m in read_metrics(tmp_path)] == [1]

  # The suggested change: the smoke config's lr (1e-3). The rerun resumes from step 1 and
  # trains past step 2 exactly as a run that never had the huge lr (step 1 had lr 0 in both).
  assert c.optim.lr == 1e-3
  trainer.train(c, str(tmp_path))
  assert saved_steps(tmp_path) == [9, 12]  # keep_ckpts 2
  for step in (9, 12):
    assert non_finite_values(tmp_path, step) == {}
  records = read_metrics(tmp_path)
  assert [m["step"] for m in records] == list(range(1, TOTAL + 1))
  same_records(records, read_metrics(straight))  # step 1 (lr 0 in both) was the huge run's


# ---------------------------------------------------------------------------------------------
# Defect 2: SIGTERM / SIGINT.

@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  """An uninterrupted smoke run of TOTAL steps, every step logged, checkpoints every 3 (9 and
  12 kept): (config, workdir)."""
  c = smoke_config(total_steps=TOTAL, log_every=1, **KNOBS)
  workdir = str(tmp_path_factory.mktemp("straight"))
  trainer.train(c, workdir)
  return c, workdir


def signal_at_step(monkeypatch, step, signum):
  """Sends `signum` to this process while step `step`'s batch is being fetched (the loop
  counts calls of `sharding.global_batch`: one per step from the run's first)."""
  calls, real = [], sharding.global_batch

  def global_batch(batch, mesh):
    calls.append(1)
    if len(calls) == step:
      os.kill(os.getpid(), signum)
    return real(batch, mesh)

  monkeypatch.setattr(sharding, "global_batch", global_batch)


def test_sigint_saves_the_current_step_and_resumes_with_the_same_losses(
    straight_run, tmp_path, monkeypatch, capfd):
  c, straight = straight_run
  signal_at_step(monkeypatch, 2, signal.SIGINT)
  with pytest.raises(trainer.TrainingStopped) as e:
    trainer.train(c, str(tmp_path))
  assert (e.value.code, e.value.step, e.value.signum) == (130, 2, signal.SIGINT)
  err = capfd.readouterr().err
  assert (f"stopped by SIGINT after step 2: checkpoint 2 saved in {tmp_path}/checkpoints, "
          "metrics written; rerun the same command to resume from step 2 (exit status 130)"
          ) in err
  assert "Finalize" not in err and "Traceback" not in err
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
  assert saved_steps(tmp_path) == [2]
  monkeypatch.undo()
  trainer.train(c, str(tmp_path))
  same_records(read_metrics(tmp_path), read_metrics(straight))


def test_sigterm_while_compiling_saves_the_first_step(straight_run, tmp_path, monkeypatch,
                                                     capfd):
  """A preemption notice before the loop (compiling, restoring) is not lost: the run takes
  its first step, saves it and stops; the rerun resumes with the same losses."""
  c, straight = straight_run
  real = trainer.memory_log_line

  def memory_log_line(*args):  # called right after the train step compiled
    os.kill(os.getpid(), signal.SIGTERM)
    return real(*args)

  monkeypatch.setattr(trainer, "memory_log_line", memory_log_line)
  with pytest.raises(trainer.TrainingStopped) as e:
    trainer.train(c, str(tmp_path))
  assert (e.value.code, e.value.step) == (143, 1)
  assert "stopped by SIGTERM after step 1: checkpoint 1 saved" in capfd.readouterr().err
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
  assert saved_steps(tmp_path) == [1]
  monkeypatch.undo()
  trainer.train(c, str(tmp_path))
  same_records(read_metrics(tmp_path), read_metrics(straight))


def test_sigterm_to_train_py_saves_the_step_exits_143_and_resumes_the_same(
    straight_run, tmp_path):
  # train.py as a user runs it; the signal follows step 2's log line, TOTAL - 2 steps early.
  c, straight = straight_run
  total = TOTAL
  args = [sys.executable, "train.py", "--config=configs/demo.py:smoke",
          f"--workdir={tmp_path}", f"--config.total_steps={total}",
          "--config.log_every=1", "--config.ckpt_every=1000",
          *(f"--config.{k}={v}" for k, v in KNOBS.items())]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **cache_env()}
  proc = subprocess.Popen(args, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
  lines = []
  for line in proc.stderr:
    lines.append(line)
    if f"step 2/{total} " in line:
      proc.send_signal(signal.SIGTERM)
      break
  lines += proc.stderr.readlines()
  assert proc.wait(timeout=300) == 143, "".join(lines[-30:])
  stop = [l for l in lines if l.startswith("stopped by SIGTERM")]
  assert len(stop) == 1, "".join(lines[-30:])
  step = int(re.match(r"stopped by SIGTERM after step (\d+): checkpoint \1 saved in (\S+), "
                      r"metrics written; rerun the same command to resume from step \1 "
                      r"\(exit status 143\)$", stop[0]).group(1))
  assert 2 <= step < total
  assert saved_steps(tmp_path) == [step]
  trainer.train(c, str(tmp_path))  # resumes from `step` (the same step as train.py's)
  same_records(read_metrics(tmp_path), read_metrics(straight))


def test_kill_9_during_a_save_resumes_with_the_same_losses(straight_run, tmp_path):
  # train.py saving every step, SIGKILLed the moment a save after the first is in progress
  # (orbax's temporary step folder exists), or after 3 checkpoints; the rerun resumes from
  # the newest complete checkpoint and its losses are the uninterrupted run's.
  c, straight = straight_run
  args = [sys.executable, "train.py", "--config=configs/demo.py:smoke",
          f"--workdir={tmp_path}", f"--config.total_steps={TOTAL}", "--config.log_every=1",
          "--config.ckpt_every=1", *(f"--config.{k}={v}" for k, v in KNOBS.items())]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **cache_env()}
  proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpts, during_save = os.path.join(tmp_path, "checkpoints"), False
  while proc.poll() is None:
    names = os.listdir(ckpts) if os.path.isdir(ckpts) else []
    done = sum(n.isdigit() for n in names)
    during_save = done >= 1 and any("tmp" in n for n in names)  # a save after the first
    if during_save or done >= 3:
      proc.kill()
      break
  assert proc.wait(timeout=300) == -signal.SIGKILL
  assert saved_steps(tmp_path), "killed before any checkpoint"
  trainer.train(c, str(tmp_path))  # resumes from the newest complete checkpoint
  same_records(read_metrics(tmp_path), read_metrics(straight))


# ---------------------------------------------------------------------------------------------
# Defect 8 (first part): records of a killed run's steps after its last checkpoint.

def tb_events(workdir):
  """(file, step, what) of every event in WORKDIR/tb, files in the order they were written;
  `what` is "restart" for a SessionLog START (TensorBoard's purge marker) or the scalar tags."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out = []
  for path in sorted(glob.glob(os.path.join(workdir, "tb", "events.*"))):
    with open(path, "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):  # TFRecord: length (8), its crc (4), data, its crc (4)
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      if event.HasField("session_log") and event.session_log.status == 1:  # START
        out.append((path, event.step, "restart"))
      elif event.HasField("summary"):
        out.append((path, event.step, tuple(v.tag for v in event.summary.value)))
  return out


def test_resume_keeps_each_step_once_in_metrics_and_tensorboard(straight_run, tmp_path):
  c, straight = straight_run
  workdir = str(tmp_path / "run")
  shutil.copytree(straight, workdir)
  # A kill after steps 10..12 were logged, before step 12's checkpoint; a half-written line.
  shutil.rmtree(os.path.join(workdir, "checkpoints", "12"))
  path = os.path.join(workdir, "metrics.jsonl")
  records = read_metrics(workdir)
  with open(path, "w") as f:  # mark the killed run's records of steps 10..12
    for r in records:
      f.write(json.dumps({**r, "loss": -1.0} if r["step"] > 9 else r) + "\n")
    f.write('{"step": 12, "lo')
  trainer.train(c, workdir)
  resumed = read_metrics(workdir)
  assert [m["step"] for m in resumed] == list(range(1, TOTAL + 1))
  assert all(m["loss"] > 0 for m in resumed)  # the resumed run's values, not the marked ones
  same_records(resumed, read_metrics(straight))
  # TensorBoard: the resumed run's event file starts with a restart marker at step 10, which
  # makes TensorBoard discard the earlier file's events of steps >= 10.
  events = tb_events(workdir)
  files = sorted({e[0] for e in events})
  assert len(files) == 2
  first, second = ([e[1:] for e in events if e[0] == f] for f in files)
  assert first[0] == (1, "restart") and second[0] == (10, "restart")
  assert sorted({s for s, _ in first[1:]}) == list(range(1, TOTAL + 1))
  assert sorted({s for s, _ in second[1:]}) == [10, 11, 12]
