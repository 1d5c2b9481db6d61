"""SegFormer (MiT encoder + all-MLP decoder) against transformers'
SegformerForSemanticSegmentation with identical random weights; BatchNorm statistics in train
and eval mode; parameter counts of B0-B5 against the paper and transformers.

The transformers models run in float64 (randomly initialised from a config, offline) with every
parameter and the BatchNorm running statistics randomised; their weights reach our model
through what `save_pretrained` writes (transformers' own layout) and the small name
mapping below, independent of `segvit_jax.convert`. transformers builds every SegFormer
LayerNorm with torch's default eps 1e-5 (its config's `layer_norm_eps` is unused), so our
model runs with `norm_eps=1e-5` here.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

from segvit_jax.models import build_model

from tests import support, torch_reference as ref

TOL = 1e-4  # measured: 2.2e-6 to 2.6e-6 (float32 Flax vs float64 torch; logits up to ~3.3)

# name -> (transformers config fields, our backbone / head fields)
CONFIGS = {
    "b0": (dict(num_labels=19),
           dict(backbone=dict(variant="B0"), head=dict(width=256))),
    # B2's widths and decoder width with fewer blocks (B2: 3, 4, 6, 3), to stay fast.
    "b2_shallow": (dict(num_labels=37, hidden_sizes=[64, 128, 320, 512], depths=[2, 2, 3, 2],
                        decoder_hidden_size=768),
                   dict(backbone=dict(dims=(64, 128, 320, 512), depths=(2, 2, 3, 2)),
                        head=dict(width=768))),
}
SIZES = {"b0": [(512, 512), (384, 640), (97, 131)], "b2_shallow": [(512, 512), (384, 640)]}


# ---------------------------------------------------------------------------------------------
# transformers' saved layout -> our variables

_BLOCK = r"segformer\.encoder\.block\.(?P<s>\d+)\.(?P<j>\d+)\."
_RENAMES = [  # (regex on a saved key without its last component, our module path)
    (r"segformer\.encoder\.patch_embeddings\.(?P<s>\d+)\.proj", "backbone/patch_embed_{s}/proj"),
    (r"segformer\.encoder\.patch_embeddings\.(?P<s>\d+)\.layer_norm",
     "backbone/patch_embed_{s}/norm"),
    (_BLOCK + r"layer_norm_1", "backbone/block_{s}_{j}/norm1"),
    (_BLOCK + r"attention\.self\.(?P<x>query|key|value)", "backbone/block_{s}_{j}/attn/{x}"),
    (_BLOCK + r"attention\.self\.sr", "backbone/block_{s}_{j}/sr"),
    (_BLOCK + r"attention\.self\.layer_norm", "backbone/block_{s}_{j}/sr_norm"),
    (_BLOCK + r"attention\.output\.dense", "backbone/block_{s}_{j}/attn/out"),
    (_BLOCK + r"layer_norm_2", "backbone/block_{s}_{j}/norm2"),
    (_BLOCK + r"mlp\.dense1", "backbone/block_{s}_{j}/mlp/fc1"),
    (_BLOCK + r"mlp\.dwconv\.dwconv", "backbone/block_{s}_{j}/mlp/dwconv"),
    (_BLOCK + r"mlp\.dense2", "backbone/block_{s}_{j}/mlp/fc2"),
    (r"segformer\.encoder\.layer_norm\.(?P<s>\d+)", "backbone/norm_{s}"),
    (r"decode_head\.linear_c\.(?P<s>\d+)\.proj", "head/linear_c_{s}"),
    (r"decode_head\.(?P<x>linear_fuse|batch_norm|classifier)", "head/{x}"),
]


def _module_path(prefix: str) -> str:
  """A saved module name -> our module path; stages count from 1 here, from 0 there."""
  for pattern, path in _RENAMES:
    if m := re.fullmatch(pattern, prefix):
      fields = m.groupdict()
      if "s" in fields:
        fields["s"] = int(fields["s"]) + 1
      return path.format(**fields)
  raise KeyError(f"unmapped transformers key {prefix!r}")


def hf_to_variables(state: dict[str, torch.Tensor]) -> dict:
  """transformers' SegFormer state dict (saved layout) -> {"params", "batch_stats"}."""
  variables: dict = {"params": {}, "batch_stats": {}}
  for key, tensor in state.items():
    prefix, leaf = key.rsplit(".", 1)
    if leaf == "num_batches_tracked":
      continue
    v = tensor.detach().to(torch.float64).numpy()
    collection = "params"
    if leaf in ("running_mean", "running_var"):
      collection, name = "batch_stats", leaf.removeprefix("running_")
    elif leaf == "bias":
      name = "bias"
    elif v.ndim == 4:  # conv (O, I, kh, kw) -> (kh, kw, I, O)
      name, v = "kernel", v.transpose(2, 3, 1, 0)
    elif v.ndim == 2:  # Linear (O, I) -> Dense (I, O)
      name, v = "kernel", v.T
    else:  # LayerNorm / BatchNorm weight
      name = "scale"
    node = variables[collection]
    for part in _module_path(prefix).split("/"):
      node = node.setdefault(part, {})
    node[name] = jnp.asarray(v, jnp.float32)
  return variables


def _flax_model(fields: dict, num_classes: int):
  return build_model({"name": "segformer", "num_classes": num_classes,
                      "backbone": {**fields["backbone"], "norm_eps": 1e-5},
                      "head": fields["head"]})


def _images(h: int, w: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((1, h, w, 3)).astype(np.float32)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def outputs(request, tmp_path_factory):
  """(name, num_labels, {size: (transformers logits, our output dict)}) for one config."""
  name = request.param
  hf_fields, fields = CONFIGS[name]
  torch.manual_seed(0)
  hf = transformers.SegformerForSemanticSegmentation(transformers.SegformerConfig(**hf_fields))
  hf = hf.double().eval()
  ref.randomize_module_(hf, seed=1)
  path = tmp_path_factory.mktemp(name)
  hf.save_pretrained(path)
  variables = hf_to_variables(safetensors.torch.load_file(str(path / "model.safetensors")))
  model = _flax_model(fields, hf_fields["num_labels"])
  # Strict: exactly our variables, with our shapes.
  abstract = nn.meta.unbox(jax.eval_shape(functools.partial(model.init, train=False),
                                          jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  assert jax.tree.structure(abstract) == jax.tree.structure(variables)
  for want, got in zip(jax.tree.leaves(abstract), jax.tree.leaves(variables)):
    assert want.shape == got.shape

  # All torch runs first, then all JAX runs: on 2 CPU cores, torch calls made after JAX ones
  # ran several times slower here.
  sizes = SIZES[name]
  with torch.no_grad():
    want = [hf(torch.from_numpy(_images(h, w, i)).permute(0, 3, 1, 2).double()).logits.numpy()
            for i, (h, w) in enumerate(sizes)]
  fwd = jax.jit(lambda v, x: model.apply(v, x, train=False))
  with jax.default_matmul_precision("highest"):
    got = [jax.device_get(fwd(variables, _images(h, w, i))) for i, (h, w) in enumerate(sizes)]
  return name, hf_fields["num_labels"], dict(zip(sizes, zip(want, got)))


def test_logits_match_transformers(outputs):
  name, num_labels, results = outputs
  for (h, w), (want, out) in results.items():
    got = np.asarray(out["logits"], np.float64)
    assert got.shape == want.shape == (1, num_labels, (h + 3) // 4, (w + 3) // 4)
    diff = np.max(np.abs(got - want))
    print(f"{name} {h}x{w}: max |logits| {np.max(np.abs(want)):.2f}, max abs diff {diff:.2e}")
    assert diff < TOL, (name, h, w, diff)


def test_semantic_scores_are_logits_resized_as_torch(outputs):
  _, _, results = outputs
  for (h, w), (want, out) in results.items():
    up = torch.nn.functional.interpolate(torch.from_numpy(want), size=(h, w), mode="bilinear",
                                         align_corners=False).numpy()
    assert out["semantic_scores"].shape == up.shape
    assert np.max(np.abs(np.asarray(out["semantic_scores"], np.float64) - up)) < TOL


def test_batch_norm_statistics_train_and_eval():
  """train=True normalises with the batch statistics and moves the running ones by torch's
  momentum 0.1 (flax momentum 0.9); train=False reads them, changes nothing, and is
  deterministic."""
  model = build_model({"name": "segformer", "num_classes": 5, "head": {"width": 32},
                       "backbone": {"dims": (8, 16, 40, 64), "depths": (1, 1, 1, 1)}})
  images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64, 96, 3)), jnp.float32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), images)
  assert set(abstract) == {"params", "batch_stats"}
  # Random values instead of model.init (whose compilation takes longer than this test).
  rng = np.random.default_rng(1)

  def fill(path, x):
    name = path[-1].key
    z = rng.standard_normal(x.shape)
    v = {"kernel": z / np.sqrt(np.prod(x.shape[:-1])), "scale": 1 + 0.2 * z, "bias": 0.2 * z,
         "mean": 0.3 * z, "var": np.exp(0.5 * z)}[name]
    return jnp.asarray(v, jnp.float32)

  variables = jax.tree_util.tree_map_with_path(fill, nn.meta.unbox(abstract))
  stats = variables["batch_stats"]

  train_step = jax.jit(lambda v, x, key: model.apply(
      v, x, train=True, mutable=["batch_stats", "intermediates"], rngs={"dropout": key},
      capture_intermediates=lambda m, _: m.name == "linear_fuse"))
  out, updates = train_step(variables, images, jax.random.key(2))
  pre_bn = updates["intermediates"]["head"]["linear_fuse"]["__call__"][0]  # (B, h, w, C)
  new = updates["batch_stats"]["head"]["batch_norm"]
  old = stats["head"]["batch_norm"]
  mean, var = pre_bn.mean(axis=(0, 1, 2)), pre_bn.var(axis=(0, 1, 2))
  np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * var, rtol=1e-5, atol=1e-6)
  assert np.max(np.abs(new["mean"] - old["mean"])) > 1e-2

  eval_step = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["batch_stats"]))
  eval_out, eval_updates = eval_step(variables, images)
  for a, b in zip(jax.tree.leaves(eval_updates["batch_stats"]), jax.tree.leaves(stats)):
    np.testing.assert_array_equal(a, b)
  again, _ = eval_step(variables, images)
  np.testing.assert_array_equal(eval_out["logits"], again["logits"])
  # Batch statistics (and dropout) in train mode, running ones in eval mode.
  assert np.max(np.abs(out["logits"] - eval_out["logits"])) > 1e-3


_SHARDED_BN = r"""
import json
import flax.linen as nn, jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from segvit_jax import sharding
from segvit_jax.models import build_model

model = build_model({"name": "segformer", "num_classes": 5,
                     "head": {"width": 32, "dropout": 0.0},
                     "backbone": {"dims": (8, 16, 40, 64), "depths": (1, 1, 1, 1),
                                  "drop_path": 0.0}})
x = np.random.default_rng(0).standard_normal((8, 64, 64, 3)).astype(np.float32)
x[:4] *= 3.0  # the devices' shards have different statistics
v = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), x))
f = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
ref_out, ref_stats = f(v, x)
mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
  out, stats = f(v, jax.device_put(x, NamedSharding(mesh, P("data"))))
diff = lambda a, b: max(float(np.max(np.abs(np.asarray(p) - np.asarray(q))))
                        for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
print("RESULT " + json.dumps({"devices": jax.device_count(), "stats": diff(stats, ref_stats),
                              "logits": diff(out["logits"], ref_out["logits"]),
                              "spec": str(out["logits"].sharding.spec)}))
"""


def test_batch_norm_statistics_are_global_under_data_parallelism():
  """With the batch sharded over 4 devices, one jitted train step gives the statistics (and
  outputs) of the whole batch: synchronised BatchNorm without an axis_name."""
  root = support.ROOT
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": " ".join([*flags, "--xla_force_host_platform_device_count=4"]),
         "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
  proc = subprocess.run([sys.executable, "-c", _SHARDED_BN], cwd=root, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.split("RESULT ", 1)[1])
  assert result["devices"] == 4 and "'data'" in result["spec"]
  assert result["stats"] < 1e-6 and result["logits"] < 1e-5, result


# name: (exact parameter count with the 150-class head, paper's "params" in millions)
PARAM_COUNTS = {
    "B0": (3_752_694, 3.8), "B1": (13_715_798, 13.7), "B2": (27_461_974, 27.5),
    "B3": (47_337_814, 47.3), "B4": (64_108_374, 64.1), "B5": (84_708_694, 84.7),
}
_HF_SIZES = {"B0": ((32, 64, 160, 256), (2, 2, 2, 2)), "B1": ((64, 128, 320, 512), (2, 2, 2, 2)),
             "B2": ((64, 128, 320, 512), (3, 4, 6, 3)), "B3": ((64, 128, 320, 512), (3, 4, 18, 3)),
             "B4": ((64, 128, 320, 512), (3, 8, 27, 3)), "B5": ((64, 128, 320, 512), (3, 6, 40, 3))}


@pytest.mark.parametrize("variant", sorted(PARAM_COUNTS))
def test_parameter_counts(variant):
  count, paper_m = PARAM_COUNTS[variant]
  width = 256 if variant in ("B0", "B1") else 768
  model = build_model({"name": "segformer", "num_classes": 150,
                       "backbone": {"variant": variant}, "head": {"width": width}})
  abstract = nn.meta.unbox(jax.eval_shape(functools.partial(model.init, train=False),
                                          jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  assert sum(x.size for x in jax.tree.leaves(abstract["params"])) == count
  assert round(count / 1e6, 1) == paper_m
  # transformers' model of the same sizes (built on the meta device: no memory, no init),
  # parameters only (not the BatchNorm running statistics).
  dims, depths = _HF_SIZES[variant]
  config = transformers.SegformerConfig(hidden_sizes=list(dims), depths=list(depths),
                                        decoder_hidden_size=width, num_labels=150)
  with torch.device("meta"):
    hf = transformers.SegformerForSemanticSegmentation(config)
  assert sum(p.numel() for p in hf.parameters()) == count


def test_input_too_small_for_key_value_reduction():
  model = _flax_model(CONFIGS["b0"][1], num_classes=3)
  with pytest.raises(ValueError, match="smaller than the key/value reduction 8x8"):
    jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                   jnp.zeros((1, 28, 64, 3)))
