"""Scanned ViT blocks (`scan_layers`), remat policies and the block-layout conversion that keeps
checkpoints and bundles interchangeable between the two layouts.

Measured (CPU, jitted, same weights, drop path 0.6 on the last of 3 blocks):
  float32, scanned (with or without remat) vs unrolled: deterministic, every output
    bit-identical and gradients <= 8.9e-8 apart; with drop path (both layouts draw the same
    masks) blocks <= 2.4e-7, outputs after the final norm <= 1.0e-6, gradients <= 3.6e-7 except
    the register tokens' (1.3e-5, float32 rounding: see test_scan_matches_unrolled);
  float64: every output and gradient <= 3.3e-15 apart.
  trainer, smoke config with drop path 0.2, from the same weights: the scanned run's losses,
    and those of runs resuming a checkpoint of the other layout, equal the unrolled run's
    bit for bit.
From scratch the layouts initialise differently (flax derives an unrolled block's init key
from its module path, nn.scan splits one key per layer); every comparison starts from the same
weights.
"""

import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from configs import demo
from segvit_jax import bundle, checkpoint, sharding, trainer
from segvit_jax.models import build_model, vit

from tests import support

ROOT = support.ROOT

# Class token in the blocks, registers, LayerScale and a final norm: every path of the ViT.
TINY = dict(width=32, depth=3, mlp_dim=64, num_heads=2, patch_size=4, posemb_grid=(4, 4),
            num_registers=2, layerscale=0.1)


def tiny_pair(**kw):
  unrolled, scanned = vit.ViT(**TINY, **kw), vit.ViT(**TINY, **kw, scan_layers=True)
  images = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  init = jax.jit(lambda: nn.meta.unbox(unrolled.init(jax.random.key(0), images)["params"]))
  return unrolled, scanned, init(), images


def outputs_and_grads(model, params, images, modes=("det", "drop")):
  """Every output (tokens, each block, cls, registers) and the parameter gradients of a loss
  reading all of them, deterministic ("det") and with drop path ("drop"), in one program."""
  def loss(p, train):
    tokens, aux = model.apply({"params": p}, images, train=train,
                              rngs={"dropout": jax.random.key(7)})
    out = {"tokens": tokens, "blocks": aux["blocks"], "cls": aux["cls"],
           "registers": aux["registers"]}
    value = (jnp.mean(tokens**2) + sum(jnp.mean(jnp.sin(b)) for b in aux["blocks"])
             + jnp.mean(aux["cls"]) + jnp.mean(aux["registers"] ** 2))
    return value, out

  def both(p):
    results = {}
    for mode in modes:
      (_, out), grads = jax.value_and_grad(loss, has_aux=True)(p, mode == "drop")
      results[mode] = {**out, "grads": grads}
    return results

  return jax.jit(both)(params)


@pytest.fixture(scope="module")
def unrolled_reference():
  unrolled, _, params, images = tiny_pair(drop_path=0.6)
  ref = outputs_and_grads(unrolled, params, images)
  for mode in ref:
    ref[mode]["grads"] = vit.stack_blocks(ref[mode]["grads"])
  return params, images, ref


def scanned_vit(remat: bool, dtype=jnp.float32) -> vit.ViT:
  return vit.ViT(**TINY, drop_path=0.6, scan_layers=True, remat=remat,
                 remat_policy="dots_with_no_batch_dims_saveable", dtype=dtype)


@pytest.mark.parametrize("remat", [False, True])
def test_scan_matches_unrolled(unrolled_reference, remat):
  params, images, ref = unrolled_reference
  stacked = vit.stack_blocks(params)
  assert stacked["encoderblock"]["attn"]["query"]["kernel"].shape == (3, 32, 32)
  got = outputs_and_grads(scanned_vit(remat), stacked, images)
  for mode in ("det", "drop"):
    want = ref[mode]
    assert len(got[mode]["blocks"]) == 3 and got[mode]["blocks"][0].shape == (4, 4, 4, 32)
    # Measured, with and without remat alike. Deterministic: every output bit-identical.
    # Drop path: blocks <= 2.4e-7 (the same masks; rounding in the scaled LayerScale
    # branches); tokens / cls / registers after the final norm <= 1.0e-6 (relative 5.7e-7).
    for a, b in zip(want["blocks"], got[mode]["blocks"]):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    for key in ("tokens", "cls", "registers"):
      np.testing.assert_allclose(want[key], got[mode][key], rtol=1e-6, atol=1e-6)
    # Gradients: <= 8.9e-8 deterministic, <= 3.6e-7 with drop path (|grad| up to 0.53), but
    # for the register tokens': 1.3e-5 with drop path. That one sums every token's gradient
    # and float32 resolves it no better: the unrolled model itself is 8.1e-6 from its float64
    # value (the scanned one 6.0e-6); float64 agrees to 1e-12 (test below).
    grads_u, grads_s = want["grads"], got[mode]["grads"]
    assert jax.tree.structure(grads_u) == jax.tree.structure(grads_s)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads_u),
                            jax.tree.leaves(grads_s)):
      atol = 3e-5 if jax.tree_util.keystr(path) == "['registers']" else 1e-6
      np.testing.assert_allclose(a, b, rtol=0, atol=atol, err_msg=jax.tree_util.keystr(path))
  # Drop path really dropped examples (else the comparison would say little).
  assert support.max_diff(got["det"]["tokens"], got["drop"]["tokens"]) > 0.1


def test_scan_matches_unrolled_float64(unrolled_reference):
  """The same computation: in float64 every output and gradient agrees to rounding."""
  params, images, _ = unrolled_reference
  with jax.enable_x64(True):
    params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
    images = images.astype(jnp.float64)
    unrolled = vit.ViT(**TINY, drop_path=0.6, dtype=jnp.float64)
    want = outputs_and_grads(unrolled, params, images, ["drop"])["drop"]
    got = outputs_and_grads(scanned_vit(True, jnp.float64), vit.stack_blocks(params), images,
                            ["drop"])["drop"]
    want["grads"] = vit.stack_blocks(want["grads"])
    assert jax.tree.structure(want) == jax.tree.structure(got)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
      assert a.dtype == jnp.float64
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)  # measured <= 3.3e-15


def test_drop_path_masks_follow_the_rng():
  _, scanned, params, images = tiny_pair(drop_path=0.6)
  stacked = vit.stack_blocks(params)
  apply = jax.jit(lambda key: scanned.apply({"params": stacked}, images, train=True,
                                            rngs={"dropout": key})[1]["blocks"][-1])
  assert support.max_diff(apply(jax.random.key(7)), apply(jax.random.key(7))) == 0.0
  assert support.max_diff(apply(jax.random.key(7)), apply(jax.random.key(8))) > 0.1


def test_remat_policies():
  for name in ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
               "everything_saveable"):
    assert vit.remat_policy(name) is getattr(jax.checkpoint_policies, name)
  with pytest.raises(ValueError, match=r"^unknown remat_policy 'save_everything'; known: "
                     r"nothing_saveable, dots_saveable, dots_with_no_batch_dims_saveable, "
                     r"everything_saveable$"):
    vit.remat_policy("save_everything")
  # The model checks the name even without remat (a typo fails before any training).
  model = vit.ViT(**TINY, remat_policy="save_everything")
  with pytest.raises(ValueError, match=r"^unknown remat_policy 'save_everything'"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))


def test_stack_unstack_round_trip():
  _, _, params, _ = tiny_pair()
  state = {"params": params, "opt_state": optax.adam(1e-3).init(params)}  # mu / nu mirror it
  stacked = vit.stack_blocks(state)
  assert vit.blocks_layout(state) == "unstacked" and vit.blocks_layout(stacked) == "stacked"
  for tree in (stacked["params"], stacked["opt_state"][0].mu, stacked["opt_state"][0].nu):
    assert "encoderblock_0" not in tree and tree["encoderblock"]["mlp"]["fc1"]["kernel"].shape \
        == (3, 32, 64)
  assert stacked["params"]["pos_embedding"] is params["pos_embedding"]  # the rest untouched
  np.testing.assert_array_equal(stacked["params"]["encoderblock"]["ls1"][2],
                                params["encoderblock_2"]["ls1"])
  for tree in (state, jax.device_get(state)):  # jax and numpy arrays
    again = vit.unstack_blocks(vit.stack_blocks(tree))
    assert jax.tree.structure(again) == jax.tree.structure(tree)
    assert support.max_diff(again, tree) == 0.0
    restacked = vit.stack_blocks(vit.unstack_blocks(vit.stack_blocks(tree)))
    assert support.max_diff(restacked, vit.stack_blocks(tree)) == 0.0
  assert isinstance(vit.stack_blocks(jax.device_get(params))["encoderblock"]["ls1"], np.ndarray)
  # Already in the asked layout, or no blocks at all: unchanged.
  assert support.max_diff(vit.stack_blocks(stacked), stacked) == 0.0
  assert vit.unstack_blocks({"head": {"w": 1}}) == {"head": {"w": 1}}
  with pytest.raises(ValueError, match=r"cannot stack blocks \[0, 2\]"):
    vit.stack_blocks({"encoderblock_0": {"w": 1}, "encoderblock_2": {"w": 1}})


def test_stacked_params_shard_like_their_blocks():
  _, scanned, _, images = tiny_pair()
  boxed = jax.eval_shape(lambda: scanned.init(jax.random.key(0), images))["params"]
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
  # Without a rule for "layers" flax leaves the axis unsharded, as the rule ("layers", None).
  for rules in (sharding.LOGICAL_RULES, [r for r in sharding.LOGICAL_RULES if r[0] != "layers"]):
    sh = sharding.logical_shardings(boxed, mesh, rules)
    assert sh["encoderblock"]["attn"]["query"]["kernel"].spec == P(None, "fsdp", "tensor")
    assert sh["encoderblock"]["mlp"]["fc2"]["bias"].spec == P(None, "fsdp")
    assert sh["embedding"]["kernel"].spec == P(None, None, None, "fsdp")


def test_merge_params_across_layouts():
  unrolled, scanned, params, images = tiny_pair()
  init_u = bundle.abstract_variables(unrolled, {"backbone": TINY})["params"]
  init_s = bundle.abstract_variables(scanned, {"backbone": TINY})["params"]
  stacked = jax.device_get(vit.stack_blocks(params))
  for init, loaded, want in ((init_s, params, stacked), (init_u, stacked, params),
                             (init_s, stacked, stacked), (init_u, params, params)):
    merged = bundle.merge_params(init, loaded)
    assert jax.tree.structure(merged) == jax.tree.structure(want)
    assert support.max_diff(merged, want) == 0.0
  # A real mismatch reads the same for either model layout: canonical (unrolled) key names.
  broken = jax.device_get(params)
  del broken["encoderblock_1"]["norm2"]
  broken["encoderblock_2"]["ls2"] = np.zeros(16, np.float32)
  broken_stacked = jax.device_get(vit.stack_blocks(params))
  del broken_stacked["encoderblock"]["norm2"]
  broken_stacked["encoderblock"]["ls2"] = np.zeros((3, 16), np.float32)
  for loaded, want in (
      (broken, "  missing (2): encoderblock_1/norm2/bias, encoderblock_1/norm2/scale\n"
               "  mis-shaped (1): encoderblock_2/ls2: expected (32,), got (16,)"),
      (broken_stacked,
       "  missing (6): " + ", ".join(f"encoderblock_{i}/norm2/{n}" for i in range(3)
                                     for n in ("bias", "scale")) + "\n"
       "  mis-shaped (3): " + ", ".join(f"encoderblock_{i}/ls2: expected (32,), got (16,)"
                                        for i in range(3)))):
    for init in (init_u, init_s):
      with pytest.raises(ValueError) as e:
        bundle.merge_params(init, loaded, source="x")
      assert str(e.value) == "parameters from x do not match the model:\n" + want


# --- Checkpointer.restore across layouts, on a sharded mesh (8 CPU devices, subprocess) ---

_RESTORE_WORKER = r'''
import json, sys
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np, optax
from segvit_jax import checkpoint, sharding
from segvit_jax.models import vit

def spec(x):
  return [a if a is None or isinstance(a, str) else list(a) for a in x.sharding.spec]

TINY = dict(width=32, depth=3, mlp_dim=64, num_heads=2, patch_size=4, posemb_grid=(4, 4))
mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
tx = optax.adam(1e-3)

def abstract_state(scan):  # as the trainer: shapes -> logical shardings
  model = vit.ViT(**TINY, scan_layers=scan)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))
  p_sh = sharding.logical_shardings(boxed["params"], mesh)
  params = nn.meta.unbox(boxed["params"])
  opt = jax.eval_shape(tx.init, params)
  o_sh = optax.tree_map_params(tx, lambda _, s: s, opt, p_sh,
                               transform_non_params=lambda _: sharding.replicated(mesh))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      {"params": params, "opt_state": opt}, {"params": p_sh, "opt_state": o_sh})

rng = np.random.default_rng(0)
out = {}
for src, dst in ((False, True), (True, False)):
  # Distinct values everywhere (Adam's mu / nu included) show which entry went where.
  values = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype)
                        if a.dtype == np.float32 else np.ones(a.shape, a.dtype),
                        abstract_state(src))
  saved = jax.tree.map(lambda v, a: jax.device_put(v, a.sharding), values, abstract_state(src))
  target = abstract_state(dst)
  d = f"{sys.argv[1]}/{src}"
  ckpt = checkpoint.Checkpointer(d, async_save=False)
  ckpt.save(1, saved)
  ckpt.close()
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    restored = checkpoint.Checkpointer(d).restore(target)
  want = vit.stack_blocks(values) if dst else vit.unstack_blocks(values)
  block = "encoderblock" if dst else "encoderblock_1"
  out[f"{'scanned' if src else 'unrolled'}->{'scanned' if dst else 'unrolled'}"] = {
      "structure": jax.tree.structure(restored) == jax.tree.structure(target),
      "max_diff": max(float(np.max(np.abs(np.asarray(a) - b))) for a, b in
                      zip(jax.tree.leaves(restored), jax.tree.leaves(want))),
      "shardings": all(a.sharding == t.sharding for a, t in
                       zip(jax.tree.leaves(restored), jax.tree.leaves(target))),
      "query_spec": spec(restored["params"][block]["attn"]["query"]["kernel"]),
      "mu_spec": spec(restored["opt_state"][0].mu[block]["mlp"]["fc1"]["kernel"]),
  }
print("RESULT " + json.dumps(out))
'''


def test_checkpoint_restores_across_layouts_with_shardings(tmp_path):
  env = support.device_env(8)  # the session's XLA flags and compilation cache (conftest.py)
  proc = subprocess.run([sys.executable, "-c", _RESTORE_WORKER, str(tmp_path)], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  res = json.loads(line.removeprefix("RESULT "))
  assert res == {
      "unrolled->scanned": {"structure": True, "max_diff": 0.0, "shardings": True,
                            "query_spec": [None, "fsdp", "tensor"],
                            "mu_spec": [None, "fsdp", "tensor"]},
      "scanned->unrolled": {"structure": True, "max_diff": 0.0, "shardings": True,
                            "query_spec": ["fsdp", "tensor"], "mu_spec": ["fsdp", "tensor"]},
  }


# --- Trainer: the smoke config in both layouts, handing over through checkpoints ---

DROP_PATH = 0.2  # on: both layouts draw the same masks


def smoke_config(scan: bool, model_init: str = ""):
  c = demo.get_config("smoke")
  c.total_steps, c.ckpt_every, c.log_every, c.keep_ckpts = 6, 2, 1, 3
  c.optim.warmup_steps = 0  # full lr from step 1: the steps move the parameters
  c.model.backbone.update(scan_layers=scan, drop_path=DROP_PATH)
  c.model_init = model_init
  return c


def read_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {m["step"]: m["loss"] for m in map(json.loads, f)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """6 steps unrolled and 6 steps scanned from the same weights (a bundle as model_init;
  checkpoints at 2, 4, 6); a scanned run resuming the unrolled run's step-2 checkpoint, an
  unrolled run resuming the scanned run's step-4 checkpoint."""
  root = tmp_path_factory.mktemp("scan_runs")
  c = smoke_config(False)
  model = build_model(c.model)
  init = jax.jit(lambda: nn.meta.unbox(
      model.init(jax.random.key(0), jnp.zeros(trainer.input_shape(c)))["params"]))()
  start = bundle.save_bundle(str(root / "start"), init, c.model, mean=c.mean, std=c.std,
                             class_names=[f"c{i}" for i in range(c.model.num_classes)])
  out = {"root": root}
  for name, scan, source, step in (("unrolled", False, None, None),
                                   ("scanned", True, None, None),
                                   ("scanned_resumed", True, "unrolled", "2"),
                                   ("unrolled_resumed", False, "scanned", "4")):
    workdir = root / name
    if source:
      shutil.copytree(root / source / "checkpoints" / step, workdir / "checkpoints" / step)
    trainer.train(smoke_config(scan, start), str(workdir))
    out[name] = read_losses(workdir)
  return out


def test_training_in_either_layout_and_handing_over(runs):
  ref = runs["unrolled"]
  assert sorted(ref) == [1, 2, 3, 4, 5, 6]
  assert ref[6] < ref[1] - 0.2  # the steps move the parameters (measured 9.64 -> 9.22)
  # Scanned from the start; scanned from the unrolled step-2 checkpoint; unrolled from the
  # scanned step-4 checkpoint: the unrolled run's losses (measured: bit-identical).
  for name, steps in (("scanned", [1, 2, 3, 4, 5, 6]), ("scanned_resumed", [3, 4, 5, 6]),
                      ("unrolled_resumed", [5, 6])):
    assert sorted(runs[name]) == steps, name
    for step, loss in runs[name].items():
      assert loss == pytest.approx(ref[step], rel=0, abs=1e-5), (name, step)
  # Each run saved its own layout.
  for name, layout in (("unrolled", "unstacked"), ("scanned", "stacked"),
                       ("scanned_resumed", "stacked"), ("unrolled_resumed", "unstacked")):
    params, _ = checkpoint.restore_params(str(runs["root"] / name / "checkpoints"), 6)
    assert vit.blocks_layout(params) == layout, name


def test_load_model_of_a_scanned_workdir(runs, tmp_path):
  workdir = str(runs["root"] / "scanned")
  saved, _ = checkpoint.restore_params(os.path.join(workdir, "checkpoints"))
  loaded = checkpoint.load_model(workdir)
  assert loaded.config.model.backbone.scan_layers
  assert support.max_diff(loaded.variables["params"], saved) == 0.0  # the model's (stacked) layout
  # Written out, it is a canonical bundle: unrolled blocks, equal to the checkpoint's.
  cfg = loaded.config
  path = bundle.save_bundle(str(tmp_path / "b"), loaded.variables["params"], cfg.model,
                            mean=cfg.mean, std=cfg.std, class_names=cfg.class_names)
  stored = bundle.load_params(path)
  assert vit.blocks_layout(stored) == "unstacked"
  assert sorted(k for k in stored["backbone"] if k.startswith("encoderblock")) == [
      "encoderblock_0", "encoderblock_1"]
  assert support.max_diff(stored, vit.unstack_blocks(jax.device_get(saved))) == 0.0
  # It loads as either layout and predicts the same scores.
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  scores = loaded.predict(images)
  with open(os.path.join(path, "config.json")) as f:
    meta = json.load(f)
  meta["model"]["backbone"]["scan_layers"] = False
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(meta, f)
  unrolled = bundle.load_bundle(path)
  assert vit.blocks_layout(unrolled.variables["params"]) == "unstacked"
  np.testing.assert_allclose(unrolled.predict(images), scores, rtol=0, atol=1e-6)  # measured 0
