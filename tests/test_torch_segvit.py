"""SegViT and SegViT-Shrunk in plain PyTorch (segvit_jax/torch/) against our Flax models with
the same weights, and against the independent reference of tests/torch_reference.py.

- From our bundle (`segvit_jax.torch.load(BUNDLE)`): every output (class logits, mask logits,
  the auxiliary stages' / layers', semantic scores) equals the Flax model's.
- `python -m segvit_jax.convert BUNDLE OUT.pt --to torch` writes a file torch.load reads with
  weights_only=True (plain containers); `segvit_jax.torch.load(OUT.pt)` gives the bundle's
  module exactly; `--from torch` gives the bundle back, bitwise.
- From a release-layout .pth (written by torch.save from the randomly initialised reference,
  with the release's loss buffers, meta and optimizer state) and our config: the module
  equals the Flax model converted from the same file (`--from segvit-official`) and the
  reference itself.
- `from_config` with run-time options the release's files do not record (the class token in
  the blocks, the other position-embedding / QU-query resize methods) equals the Flax model.
- Errors name the file, the key or the setting.

The library module stays apart from tests/torch_reference.py on purpose: the reference takes
its weights from our Flax parameters by hand-written copies, and certifies the Flax model; the
library module loads through the converter's key table (`convert/segvit_official.py`), so
comparing the two also checks that table.

Size: 40 x 56, not square and not a multiple of 32; ATM at patch 8 (a 5 x 7 grid from the
stored 8 x 8), Shrunk at patch 4 (10 x 14, 5 x 7 after query down-sampling; query grid 8 x 8):
the position embedding and the QU queries are resized (bicubic) in both. Tolerance 1e-4 (float32
torch against float32 jax).
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import segvit_jax.torch as segvit_torch
from segvit_jax import bundle, config_utils
from segvit_jax.convert import __main__ as cli
from segvit_jax.convert import segvit_official
from segvit_jax.data import synthetic
from segvit_jax.models import build_model

from tests import support, torch_reference as ref

KINDS = ("atm", "shrunk")
SIZE = (40, 56)
TOL = 1e-4
OUTPUTS = ("class_logits", "mask_logits", "semantic_scores")



@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> str:
  path = tmp_path_factory.mktemp("configs") / "tiny.py"
  path.write_text(support.tiny_segvit_config(shrunk_patch_size=4))
  return str(path)


def _images(seed: int = 1) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((2, *SIZE, 3)).astype(np.float32)


def _flax(model, params, images) -> dict:
  with jax.default_matmul_precision("highest"):
    out = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, images)
  return jax.tree.map(np.asarray, {k: out[k] for k in (*OUTPUTS, "aux_outputs")})


def _torch(module, images, dtype=torch.float32) -> dict:
  with torch.no_grad():
    out = module.to(dtype)(torch.from_numpy(images).permute(0, 3, 1, 2).to(dtype))
  return jax.tree.map(lambda t: t.double().numpy(), {k: out[k] for k in (*OUTPUTS, "aux_outputs")})


def _max_diffs(a: dict, b: dict) -> dict[str, float]:
  diffs = {}
  for k in OUTPUTS:
    assert a[k].shape == b[k].shape, (k, a[k].shape, b[k].shape)
    diffs[k] = float(np.max(np.abs(a[k].astype(np.float64) - b[k])))
  assert len(a["aux_outputs"]) == len(b["aux_outputs"]) > 0
  for i, (x, y) in enumerate(zip(a["aux_outputs"], b["aux_outputs"], strict=True)):
    for k in ("class_logits", "mask_logits"):
      assert x[k].shape == y[k].shape, (i, k)
      diffs[f"aux_{i}_{k}"] = float(np.max(np.abs(x[k].astype(np.float64) - y[k])))
  return diffs


def _check(a: dict, b: dict, what: str) -> None:
  # Not a vacuous comparison: masks and scores far from constant.
  assert np.abs(a["mask_logits"]).max() > 0.25 and a["semantic_scores"].std() > 0.05
  diffs = _max_diffs(a, b)
  print(what, {k: f"{v:.1e}" for k, v in diffs.items()})
  bad = {k: v for k, v in diffs.items() if not v < TOL}
  assert not bad, (what, bad)


@pytest.fixture(scope="module", params=KINDS)
def ours(request, config_file, tmp_path_factory):
  """kind -> our Flax model with random parameters, saved as a bundle, and its outputs."""
  kind = request.param
  config = config_utils.load_config(f"{config_file}:{kind}")
  model = build_model(config.model)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  params = ref.randomize_params(flax.linen.meta.unbox(abstract)["params"], seed=3, gain=1.5)
  path = bundle.save_bundle(str(tmp_path_factory.mktemp("bundles") / kind), params,
                            config.model, mean=config.mean, std=config.std,
                            class_names=synthetic.CLASS_NAMES)
  return dict(kind=kind, config=config, spec=f"{config_file}:{kind}", bundle=path,
              out=_flax(model, params, _images()))


def test_bundle_matches_flax(ours):
  module = segvit_torch.load(ours["bundle"])
  assert type(module) is (segvit_torch.SegViTShrunk if ours["kind"] == "shrunk"
                          else segvit_torch.SegViT)
  assert not module.training
  assert module.class_names == synthetic.CLASS_NAMES
  assert module.mean == tuple(ours["config"].mean) and module.std == tuple(ours["config"].std)
  _check(ours["out"], _torch(module, _images()), f"bundle {ours['kind']}")
  # Measured (CPU, x86, 40x56, max abs): ATM class logits 1.3e-6, mask logits 4.1e-6 (aux
  # <= 3.1e-6), semantic scores 9.5e-7; Shrunk class logits 3.5e-6, mask logits 1.6e-6 (aux
  # 3.2e-6), semantic scores 3.2e-6.


def test_cli_writes_a_file_load_reads(ours, tmp_path):
  out = tmp_path / "model.pt"
  assert cli.cli([ours["bundle"], str(out), "--to", "torch"]) == 0
  obj = torch.load(out, map_location="cpu", weights_only=True)
  assert sorted(obj) == ["meta", "state_dict"]
  meta = obj["meta"]
  assert (meta["format"], meta["version"]) == ("segvit_jax.torch", 1)
  assert meta["model"] == bundle.read_config(ours["bundle"])["model"]
  assert meta["class_names"] == list(synthetic.CLASS_NAMES)
  assert all(v.dtype == torch.float32 for v in obj["state_dict"].values())
  # The release's names (no loss buffers: they are no parameters of the module).
  assert "backbone.layers.0.attn.attn.in_proj_weight" in obj["state_dict"]
  assert not any("loss_decode" in k for k in obj["state_dict"])
  a, b = segvit_torch.load(str(out)), segvit_torch.load(ours["bundle"])
  assert sorted(a.state_dict()) == sorted(b.state_dict())
  assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
  assert _max_diffs(_torch(a, _images()), _torch(b, _images()))["semantic_scores"] == 0.0
  assert cli.cli([ours["bundle"], str(out), "--to", "torch"]) == 1  # exists: --overwrite
  # And back (`--from torch`, e.g. after fine-tuning in torch): bitwise the bundle's parameters.
  again = tmp_path / "again"
  assert cli.cli([str(out), str(again), "--from", "torch"]) == 0
  first = flax.traverse_util.flatten_dict(bundle.load_params(ours["bundle"]), sep="/")
  second = flax.traverse_util.flatten_dict(bundle.load_params(str(again)), sep="/")
  assert sorted(first) == sorted(second)
  assert all(np.array_equal(first[k], second[k]) for k in first)
  meta = bundle.read_config(str(again))
  assert meta["model"] == bundle.read_config(ours["bundle"])["model"]
  assert (meta["source_format"], meta["class_names"]) == ("torch", list(synthetic.CLASS_NAMES))


# Run-time options the release's layout does not record: the class token inside the blocks
# (with QD it stays a query), the other resize methods of the position embedding / QU queries.
OPTIONS = {
    "atm": dict(backbone=dict(cls_in_blocks=True, posemb_resize="bicubic_dinov2")),
    "shrunk": dict(backbone=dict(cls_in_blocks=True, posemb_resize="bicubic_antialias"),
                   head=dict(query_resize="bilinear")),
}


@pytest.mark.parametrize("kind", KINDS)
def test_from_config_with_other_options_matches_flax(config_file, kind):
  config = config_utils.load_config(f"{config_file}:{kind}")
  for section, values in OPTIONS[kind].items():
    config.model[section].update(values)
  model = build_model(config.model)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  params = ref.randomize_params(flax.linen.meta.unbox(abstract)["params"], seed=4, gain=1.5)
  module = segvit_torch.from_config(config.model)
  segvit_torch.load_state(module, segvit_official.release_state_dict(params, kind, "params"),
                          "params")
  _check(_flax(model, params, _images(3)), _torch(module, _images(3)), f"options {kind}")
  # Measured (CPU, x86, 40x56, max abs): ATM <= 7.6e-6, Shrunk <= 1.2e-5 (class logits).


# ----------------------------------------------------------------------------------------------
# A file of the authors' release


def _reference(model_cfg) -> torch.nn.Module:
  """The independent reference of a model config (random weights to set)."""
  bb, head = dict(model_cfg.backbone), dict(model_cfg.head)
  backbone = {k: bb[k] for k in ("width", "depth", "mlp_dim", "num_heads", "patch_size")}
  backbone["posemb_grid"] = tuple(bb["posemb_grid"])
  head.pop("dropout")
  if head.pop("type", "atm") == "shrunk":
    return ref.SegViTShrunk(model_cfg.num_classes, dict(backbone, shrink_idx=bb["shrink_idx"]),
                            head).eval()
  return ref.SegViT(model_cfg.num_classes, dict(backbone, cls_token=True, cls_in_blocks=False,
                                                final_norm=False), head).eval()


@pytest.fixture(scope="module", params=KINDS)
def release(request, config_file, tmp_path_factory):
  """kind -> a release-layout .pth of a random reference (the loss buffers, meta and optimizer
  state in it, as the release's files have)."""
  kind = request.param
  config = config_utils.load_config(f"{config_file}:{kind}")
  tmodel = ref.add_atm_loss_(ref.randomize_torch_(_reference(config.model), seed=5, gain=1.5))
  state = (dict(tmodel.state_dict()) if kind == "shrunk" else ref.official_state_dict(tmodel))
  path = tmp_path_factory.mktemp(f"release_{kind}") / f"segvit_{kind}.pth"
  torch.save({"meta": {"mmseg_version": "0.24.0", "CLASSES": synthetic.CLASS_NAMES},
              "state_dict": state,
              "optimizer": {"state": {}, "param_groups": [{"lr": 2e-5, "params": []}]}},
             str(path))
  return dict(kind=kind, spec=f"{config_file}:{kind}", path=str(path), tmodel=tmodel)


def test_release_file_matches_flax_and_reference(release):
  module = segvit_torch.load(release["path"], config=release["spec"])
  assert module.class_names == synthetic.CLASS_NAMES
  params, model_cfg = segvit_official.load(release["path"], release["spec"])
  flax_out = _flax(build_model(model_cfg), params, _images(2))
  out = _torch(module, _images(2))
  _check(flax_out, out, f"release {release['kind']} vs flax")
  _check(out, _torch(release["tmodel"], _images(2), torch.float64),
         f"release {release['kind']} vs reference")
  with pytest.raises(ValueError, match=r"is not a segvit_jax.torch file \(its meta.format is "
                                       r"None.*pass config="):
    segvit_torch.load(release["path"])  # a release file records no model
  # Measured (CPU, x86, 40x56, max abs): against Flax, ATM class logits 2.7e-6, mask logits
  # 4.5e-6 (aux <= 4.8e-6), semantic scores 2.6e-6; Shrunk class logits 5.2e-6, mask logits
  # 2.0e-6, semantic scores 1.4e-6. Against the float64 reference: ATM <= 4.9e-6, Shrunk
  # <= 2.8e-6.


# ----------------------------------------------------------------------------------------------
# Errors


def test_what_the_modules_cannot_build_is_named(ours):
  cfg = bundle.read_config(ours["bundle"])["model"]
  with pytest.raises(ValueError, match=r"cannot build this model: backbone.final_norm=True "
                                       r"\(supported: False\); backbone.num_registers=4"):
    segvit_torch.from_config({**cfg, "backbone": {**cfg["backbone"], "final_norm": True,
                                                  "num_registers": 4}})
  with pytest.raises(ValueError, match="model.name='eomt': segvit_jax.torch builds SegViT"):
    segvit_torch.from_config({**cfg, "name": "eomt"})
  with pytest.raises(ValueError, match=r"head.tap_layers=\(1, 7\) out of range for a 4-block"):
    segvit_torch.from_config({**cfg, "head": {**cfg["head"], "tap_layers": [1, 7]}})


def test_bad_inputs_and_state_dicts_are_named(ours):
  module = segvit_torch.load(ours["bundle"])
  patch = module.backbone.patch_size
  with pytest.raises(ValueError, match=f"input 44x58 is not divisible by the patch size {patch}"):
    module(torch.zeros(1, 3, 44, 58))
  if ours["kind"] == "shrunk":
    with pytest.raises(ValueError, match="query down-sampling needs an even token grid, got "
                                         "9x14: input sides must be multiples of 8"):
      module(torch.zeros(1, 3, 36, 56))
  # A state dict of the wrong size: the keys named.
  state = {k: v for k, v in module.state_dict().items() if k != "backbone.cls_token"}
  state["backbone.pos_embed"] = torch.zeros(1, 5, 64)
  with pytest.raises(ValueError, match=r"missing \(1\): backbone.cls_token; mis-shaped \(1\): "
                                       r"backbone.pos_embed \(1, 5, 64\) \(the model: "
                                       r"\(1, 65, 64\)\)"):
    segvit_torch.load_state(segvit_torch.from_config(module.config), state, "x.pt")
