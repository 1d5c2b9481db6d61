"""Whole SegViT models in the layout of the authors' release (segvit_jax/convert/segvit_official.py)
against the independent PyTorch references in tests/torch_reference.py: `SegViT` (ATM head,
renamed to the release's keys by `official_state_dict`) and `SegViTShrunk` (query
down-sampling ViT, QU with STOCK torch TransformerDecoder layers, single-stage ATM head), whose
`state_dict()` keys are the release's.

- Our Shrunk (and ATM) model against the reference with identical weights copied from Flax
  (`load_*_from_flax`, independent of the converter), eval mode.
- Release-layout files written by torch.save from randomly initialised references (with meta,
  optimizer state and the loss buffers, as released files have) converted by the CLI: the
  bundles reproduce the references and record the config's test protocol (`eval`); files
  without the loss buffers convert to the same parameters.
- bundle -> --to segvit-official -> --from segvit-official -> bundle is bitwise exact; the
  exported .pth (the loss buffers `empty_weight` included) loads strictly into the references,
  which own the release's loss modules (`add_atm_loss_`), and reproduces our outputs.
- Errors name keys and causes.

References run in float64 on float32 weights, so the differences are our float32 rounding.
Weights are random with kernels 1.5 / sqrt(fan_in) (`gain`): large enough that the masks and
class scores are far from constant, small enough that float32 rounding stays below 1e-5 (at
gain 2 the 4-block backbone pushes it to 4e-5).
Sizes: the crop (64 x 64: the stored 8x8 position and query grids, the release's computation)
and 48 x 80 (6 x 10, non-square: both grids resized bicubically; the release cannot run it,
the reference resizes its QU queries as our model does).
"""

from __future__ import annotations

import copy

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from segvit_jax import bundle, config_utils
from segvit_jax.convert import rules, segvit_official, whole_model
from segvit_jax.data import synthetic
from segvit_jax.models import build_model

from tests import checkpoint_writers as writers
from tests import support
from tests import torch_reference as ref

KINDS = ("atm", "shrunk")
NUM_CLASSES = len(synthetic.CLASS_NAMES)  # the tiny config's dataset: class names in bundles
SIZES = {"crop": (64, 64), "wide": (48, 80)}
TOL = 1e-5
ROOT = support.ROOT
# The ATM loss's class-weight buffers of the release's models (mmseg BaseDecodeHead.loss_decode,
# its SetCriterion's `empty_weight`; Shrunk's TPNATMHead and its ATMSingleHead each have one).
LOSS_BUFFERS = {
    "atm": ("decode_head.loss_decode.criterion.empty_weight",),
    "shrunk": ("decode_head.loss_decode.criterion.empty_weight",
               "decode_head.atm.loss_decode.criterion.empty_weight"),
}



@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> str:
  path = tmp_path_factory.mktemp("configs") / "tiny.py"
  path.write_text(support.tiny_segvit_config())
  return str(path)


def _config(config_file: str, kind: str):
  return config_utils.load_config(f"{config_file}:{kind}")


def _torch_model(model_cfg) -> torch.nn.Module:
  """The reference of a model config, float32 (weights still to be set)."""
  bb, head = dict(model_cfg.backbone), dict(model_cfg.head)
  backbone = dict(width=bb["width"], depth=bb["depth"], mlp_dim=bb["mlp_dim"],
                  num_heads=bb["num_heads"], patch_size=bb["patch_size"],
                  posemb_grid=tuple(bb["posemb_grid"]))
  head.pop("dropout")  # the reference's default (0.1); eval mode
  if head.pop("type", "atm") == "shrunk":
    return ref.SegViTShrunk(model_cfg.num_classes, dict(backbone, shrink_idx=bb["shrink_idx"]),
                            head).eval()
  return ref.SegViT(model_cfg.num_classes,
                    dict(backbone, cls_token=True, cls_in_blocks=False, final_norm=False),
                    head).eval()


def _images(size, seed=1) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((2, *size, 3)).astype(np.float32)


def _ours(model, params, images) -> dict:
  with jax.default_matmul_precision("highest"):
    out = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, images)
  return jax.tree.map(np.asarray, {k: out[k] for k in (
      "class_logits", "mask_logits", "aux_outputs", "semantic_scores")})


def _reference(tmodel, images) -> dict:
  with torch.no_grad():
    out = tmodel.double()(torch.from_numpy(images).permute(0, 3, 1, 2).double())
  return {k: out[k] for k in ("class_logits", "mask_logits", "aux_outputs", "semantic_scores")}


def _max_diffs(out: dict, tout: dict) -> dict[str, float]:
  def d(a, b):
    b = b.numpy()
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a.astype(np.float64) - b)))

  diffs = {k: d(out[k], tout[k]) for k in ("class_logits", "mask_logits", "semantic_scores")}
  assert len(out["aux_outputs"]) == len(tout["aux_outputs"]) > 0
  for i, (a, b) in enumerate(zip(out["aux_outputs"], tout["aux_outputs"], strict=True)):
    for k in ("class_logits", "mask_logits"):
      diffs[f"aux_{i}_{k}"] = d(a[k], b[k])
  return diffs


def _check_parity(out: dict, tout: dict, what: str) -> dict[str, float]:
  # Guard against a vacuous comparison: outputs of a useful size (the Shrunk model's masks are
  # the smaller: head-averaged logits between LayerNorm'd tokens, max 0.4 - 2 here).
  assert np.abs(out["mask_logits"]).max() > 0.25 and out["semantic_scores"].std() > 0.05
  diffs = _max_diffs(out, tout)
  print(what, {k: f"{v:.1e}" for k, v in diffs.items()})
  bad = {k: v for k, v in diffs.items() if not v < TOL}
  assert not bad, (what, bad)
  return diffs


def _plain(x):
  """A config section's values as JSON gives them back: tuples as lists."""
  if isinstance(x, dict):
    return {k: _plain(v) for k, v in x.items()}
  return [_plain(v) for v in x] if isinstance(x, (tuple, list)) else x


def _class_weights(no_object_weight: float) -> torch.Tensor:
  return torch.tensor([1.0] * NUM_CLASSES + [no_object_weight], dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Our model, weights copied from Flax into the reference


@pytest.fixture(scope="module", params=KINDS)
def flax_model(request, config_file, tmp_path_factory):
  """kind -> our model with random parameters, saved as a bundle, and its outputs per size."""
  kind = request.param
  config = _config(config_file, kind)
  model = build_model(config.model)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  params = ref.randomize_params(flax.linen.meta.unbox(abstract)["params"], seed=3, gain=1.5)
  path = bundle.save_bundle(str(tmp_path_factory.mktemp("bundles") / kind), params,
                            config.model, mean=config.mean, std=config.std,
                            class_names=synthetic.CLASS_NAMES)
  outputs = {name: _ours(model, params, _images(size)) for name, size in SIZES.items()}
  return dict(kind=kind, config=config, params=params, bundle=path, outputs=outputs)


@pytest.mark.parametrize("size", SIZES)
def test_model_matches_reference(flax_model, size):
  """QD ViT + QU (stock torch decoder layers) + single-stage ATM (and the ATM model) against
  the reference, weights copied from our parameters."""
  tmodel = _torch_model(flax_model["config"].model)
  if flax_model["kind"] == "shrunk":
    ref.load_segvit_shrunk_from_flax(tmodel, flax_model["params"])
  else:
    ref.load_segvit_from_flax(tmodel, flax_model["params"])
  _check_parity(flax_model["outputs"][size], _reference(tmodel, _images(SIZES[size])),
                f"{flax_model['kind']} {size}")
  # Measured (CPU, x86, float32 vs float64), 64x64 and 48x80: Shrunk class logits <= 2.7e-6,
  # mask logits <= 3.7e-6 (final and per-layer), semantic scores <= 1.3e-6; ATM class logits
  # <= 2.9e-6, mask logits <= 4.9e-6, semantic scores <= 1.8e-6. The exported .pth in the
  # reference: the same numbers (the weights are bitwise the same).


def test_export_loads_into_reference(flax_model, tmp_path):
  """Our bundle -> .pth: the reference, with the release's loss modules, loads it strictly
  (the loss buffers too: ones, the no-object weight 0.1 last) and reproduces our outputs."""
  out = tmp_path / "exported.pth"
  assert support.convert_cli(flax_model["bundle"], out, "--to", "segvit-official") == 0
  obj = torch.load(out, map_location="cpu", weights_only=True)
  assert sorted(obj) == ["meta", "state_dict"]
  assert obj["meta"]["CLASSES"] == synthetic.CLASS_NAMES
  assert len(obj["meta"]["PALETTE"]) == NUM_CLASSES
  assert obj["meta"]["segvit_jax"]["model"]["head"]["tap_layers"] == list(
      flax_model["config"].model.head.tap_layers)
  assert all(v.dtype == torch.float32 for v in obj["state_dict"].values())
  buffers = LOSS_BUFFERS[flax_model["kind"]]
  for key in buffers:  # exactly (max abs difference 0)
    assert torch.equal(obj["state_dict"][key], _class_weights(0.1)), key
  tmodel = ref.add_atm_loss_(_torch_model(flax_model["config"].model), no_object_weight=0.5)
  if flax_model["kind"] == "shrunk":
    tmodel.load_state_dict(obj["state_dict"], strict=True)
  else:
    ref.load_official_state_dict(tmodel, obj["state_dict"])
  loaded = {ref.official_name(k) if flax_model["kind"] == "atm" else k: v
            for k, v in tmodel.state_dict().items()}
  for key in buffers:  # the file's values replaced the module's 0.5
    assert torch.equal(loaded[key], _class_weights(0.1)), key
  for name, size in SIZES.items():
    _check_parity(flax_model["outputs"][name], _reference(tmodel, _images(size)),
                  f"exported {flax_model['kind']} {name}")


# ----------------------------------------------------------------------------------------------
# Release-layout files from the references


def _release_state_dict(tmodel) -> dict[str, torch.Tensor]:
  if isinstance(tmodel, ref.SegViTShrunk):
    return dict(tmodel.state_dict())
  return ref.official_state_dict(tmodel)


def _write_release_file(path, state: dict[str, torch.Tensor]) -> None:
  """As mmseg saves it: state_dict (the reference's, the loss buffers included), meta, and
  optimizer state."""
  optimizer = {"state": {0: {"step": torch.tensor(10.0), "exp_avg": torch.randn(7)}},
               "param_groups": [{"lr": 2e-5, "weight_decay": 0.01, "params": [0]}]}
  meta = {"mmseg_version": "0.24.0", "CLASSES": synthetic.CLASS_NAMES, "iter": 160000}
  torch.save({"meta": meta, "state_dict": state, "optimizer": optimizer}, str(path))


@pytest.fixture(scope="module", params=KINDS)
def release(request, config_file, tmp_path_factory):
  """kind -> a release-layout .pth of a random reference with the release's loss modules,
  converted by the CLI (which skips the file's optimizer state and meta, and drops the loss
  buffers)."""
  kind = request.param
  config = _config(config_file, kind)
  tmodel = ref.add_atm_loss_(ref.randomize_torch_(_torch_model(config.model), seed=5, gain=1.5))
  state = {k: v.detach().clone() for k, v in _release_state_dict(tmodel).items()}
  assert set(LOSS_BUFFERS[kind]) <= set(state)
  root = tmp_path_factory.mktemp(f"release_{kind}")
  src, out = root / f"segvit_{kind}.pth", root / "bundle"
  _write_release_file(src, state)
  spec = f"{config_file}:{kind}"
  assert support.convert_cli(src, out, "--from", "segvit-official", "--config", spec) == 0
  return dict(kind=kind, config=config, spec=spec, tmodel=tmodel, state=state, src=src,
              bundle=str(out), root=root)


def test_release_file_converts_to_matching_bundle(release):
  b = bundle.load_bundle(release["bundle"])
  meta = bundle.read_config(release["bundle"])
  assert meta["source_format"] == "segvit-official"
  assert tuple(meta["class_names"]) == synthetic.CLASS_NAMES
  assert meta["mean"] == [127.5] * 3
  assert tuple(b.config.model.backbone.posemb_grid) == (8, 8)
  # The config's test protocol, whole (the ViT-B ADE20K recipe's: slide 512 / 341).
  assert meta["eval"] == _plain(release["config"].eval.to_dict())
  assert (meta["eval"]["mode"], meta["eval"]["crop_size"], meta["eval"]["stride"],
          meta["eval"]["scale"]) == ("slide", [512, 512], [341, 341], [2048, 512])
  for name, size in SIZES.items():
    images = _images(size, seed=2)
    out = _ours(b.model, b.variables["params"], images)
    _check_parity(out, _reference(copy.deepcopy(release["tmodel"]), images),
                  f"converted {release['kind']} {name}")
  # Measured (CPU, x86): Shrunk class logits <= 3.6e-6, mask logits <= 4.7e-6, semantic
  # scores <= 1.9e-6; ATM class logits <= 2.9e-6, mask logits <= 5.6e-6, semantic scores
  # <= 5.2e-6 (both sizes).


def test_round_trip_is_exact(release):
  """bundle -> .pth -> bundle: bitwise-equal parameters; the .pth equals the release file,
  the loss buffers included."""
  pth, again = release["root"] / "again.pth", release["root"] / "again"
  assert support.convert_cli(release["bundle"], pth, "--to", "segvit-official") == 0
  assert support.convert_cli(pth, again, "--from", "segvit-official", "--config",
                             release["spec"]) == 0
  first = bundle.load_params(release["bundle"])
  second = bundle.load_params(str(again))
  flat1 = flax.traverse_util.flatten_dict(first, sep="/")
  flat2 = flax.traverse_util.flatten_dict(second, sep="/")
  assert sorted(flat1) == sorted(flat2)
  unequal = [k for k in flat1 if not np.array_equal(flat1[k], flat2[k])
             or flat1[k].dtype != flat2[k].dtype]
  assert not unequal, unequal
  assert bundle.read_config(str(again))["model"] == bundle.read_config(release["bundle"])["model"]
  exported = torch.load(pth, map_location="cpu", weights_only=True)["state_dict"]
  assert sorted(exported) == sorted(release["state"])  # the loss buffers written back too
  unequal = [k for k, v in release["state"].items() if not torch.equal(exported[k], v)]
  assert not unequal, unequal


def test_release_file_without_loss_buffers_converts(release, tmp_path):
  """The loss buffers are not parameters: a file without them gives the same bundle."""
  state = {k: v for k, v in release["state"].items() if k not in LOSS_BUFFERS[release["kind"]]}
  assert len(state) == len(release["state"]) - len(LOSS_BUFFERS[release["kind"]])
  _write_release_file(tmp_path / "bare.pth", state)
  assert support.convert_cli(tmp_path / "bare.pth", tmp_path / "b", "--from", "segvit-official",
                             "--config", release["spec"]) == 0
  flat1 = flax.traverse_util.flatten_dict(bundle.load_params(release["bundle"]), sep="/")
  flat2 = flax.traverse_util.flatten_dict(bundle.load_params(str(tmp_path / "b")), sep="/")
  assert sorted(flat1) == sorted(flat2)
  assert all(np.array_equal(flat1[k], flat2[k]) for k in flat1)


def test_export_writes_the_recorded_no_object_weight(flax_model, tmp_path):
  """A bundle whose config.json records the loss (`loss.no_object_weight`, 0.25 here) exports
  that weight in the buffers; without one, the release's 0.1 (test_export_loads_into_reference)."""
  config = flax_model["config"]
  path = bundle.save_bundle(str(tmp_path / "b"), flax_model["params"], config.model,
                            mean=config.mean, std=config.std, class_names=synthetic.CLASS_NAMES,
                            loss=dict(config.loss.to_dict(), no_object_weight=0.25))
  out = tmp_path / "x.pth"
  assert support.convert_cli(path, out, "--to", "segvit-official") == 0
  state = torch.load(out, map_location="cpu", weights_only=True)["state_dict"]
  for key in LOSS_BUFFERS[flax_model["kind"]]:
    assert torch.equal(state[key], _class_weights(0.25)), (key, state[key])


# ----------------------------------------------------------------------------------------------
# Errors name keys and causes


def _error(capsys, *args) -> str:
  capsys.readouterr()
  assert support.convert_cli(*args) == 1
  return capsys.readouterr().err


def test_backbone_checkpoint_is_refused(config_file, tmp_path, capsys):
  """A timm ViT state dict is not a whole model: the message names its keys and the formats
  that read it."""
  d = 64
  tensors = {"cls_token": np.zeros((1, 1, d)), "pos_embed": np.zeros((1, 65, d)),
             "patch_embed.proj.weight": np.zeros((d, 3, 8, 8)),
             "blocks.0.attn.qkv.weight": np.zeros((3 * d, d)), "norm.weight": np.ones(d)}
  src = tmp_path / "timm_vit.pth"
  writers.save_torch(src, {k: v.astype(np.float32) for k, v in tensors.items()})
  err = _error(capsys, src, tmp_path / "out", "--from", "segvit-official", "--config",
               f"{config_file}:atm")
  assert "is not a SegViT checkpoint of the official release (no backbone.layers.* / " \
         "decode_head.* tensors" in err
  assert "blocks.0.attn.qkv.weight, cls_token" in err and "use --from timm" in err


def test_head_type_mismatch_is_explained(release, config_file, tmp_path, capsys):
  other = "atm" if release["kind"] == "shrunk" else "shrunk"
  err = _error(capsys, release["src"], tmp_path / "out", "--from", "segvit-official",
               "--config", f"{config_file}:{other}")
  if release["kind"] == "shrunk":
    assert ("has a Shrunk head (decode_head.atm.*) but the config describes an ATM head "
            "(model.head.type='atm'); use a configs/segvit_shrunk_*.py config") in err
    assert "Checkpoint: ViT width 64, 4 blocks; Shrunk head width 32, 1 stage(s) x 2 layer(s), " \
           "6 classes; QU over 2 tapped block(s)" in err
  else:
    assert "has an ATM head (decode_head.decoder_*.multihead_attn.q) but the config describes " \
           "a Shrunk head (model.head.type='shrunk'); use a configs/segvit_vit_*.py config" in err
    assert "Checkpoint: ViT width 64, 4 blocks; ATM head width 32, 3 stage(s) x 2 layer(s), " \
           "6 classes" in err


def test_config_of_another_size_names_keys(release):
  """The file does not record the depth: a config with 3 blocks fails naming the extra block."""
  config = copy.deepcopy(release["config"])
  config.model.backbone.depth = 3
  config.model.head.tap_layers = (1, 2) if release["kind"] == "shrunk" else (0, 1, 2)
  with pytest.raises(ValueError) as e:
    segvit_official.load(str(release["src"]), config)
  msg = str(e.value)
  assert "unexpected (16): backbone/encoderblock_3/attn/key/bias" in msg
  assert "checkpoint: ViT width 64, 4 blocks" in msg and "check that --config" in msg


def test_unknown_tensor_is_named(release, tmp_path):
  state = dict(release["state"], **{"decode_head.extra_conv.weight": torch.zeros(3, 3)})
  src = tmp_path / "extra.pth"
  torch.save({"state_dict": state}, str(src))
  with pytest.raises(ValueError, match=r"1 tensor\(s\) the segvit-official layout of this model "
                                       r"does not have: decode_head\.extra_conv\.weight"):
    segvit_official.load(str(src), release["config"])


def test_pickled_objects_are_refused_unless_trusted(release, tmp_path, capsys):
  src = tmp_path / "with_mmcv_meta.pth"
  writers.save_pickle_with_object(src, {k: v.numpy() for k, v in release["state"].items()})
  err = _error(capsys, src, tmp_path / "out", "--from", "segvit-official", "--config",
               release["spec"])
  assert "torch.load(weights_only=True) refuses it" in err and "--trust-pickle" in err
  assert support.convert_cli(src, tmp_path / "out", "--from", "segvit-official", "--config",
                             release["spec"], "--trust-pickle") == 0


def test_cli_usage_errors(config_file, tmp_path, capsys):
  src, out = tmp_path / "x.pth", tmp_path / "out"
  assert "give exactly one of --from FORMAT" in _error(capsys, src, out)
  assert "give exactly one of --from FORMAT" in _error(
      capsys, src, out, "--from", "timm", "--to", "segvit-official")
  assert "--from segvit-official needs --config configs/X.py[:ARG]" in _error(
      capsys, src, out, "--from", "segvit-official")
  assert "--config applies to whole-model formats (segvit-official), not --from timm" in _error(
      capsys, src, out, "--from", "timm", "--config", f"{config_file}:atm")
  assert "--image-size apply to backbone formats only" in _error(
      capsys, src, out, "--from", "segvit-official", "--config", f"{config_file}:atm",
      "--image-size", "64")
  assert f"{src} does not exist (format 'segvit-official')" in _error(
      capsys, src, out, "--from", "segvit-official", "--config", f"{config_file}:atm")
  src.write_bytes(b"")
  assert "config file nope.py not found" in _error(
      capsys, src, out, "--from", "segvit-official", "--config", "nope.py")


def test_export_refuses_what_the_release_cannot_hold(flax_model, tmp_path, capsys):
  # A backbone bundle has no decode head.
  vit_bundle = bundle.save_bundle(str(tmp_path / "vit"), {"cls": np.zeros((1, 1, 4))},
                                  {"name": "vit", "backbone": {}}, mean=[0] * 3, std=[1] * 3,
                                  class_names=[])
  assert "is a 'vit' bundle; --to segvit-official writes whole SegViT models" in _error(
      capsys, vit_bundle, tmp_path / "x.pth", "--to", "segvit-official")
  # A class token inside the blocks has the same parameters but is another model.
  cfg = flax_model["config"].model.to_dict()
  cfg["backbone"]["cls_in_blocks"] = True
  other = bundle.save_bundle(str(tmp_path / "cls"), flax_model["params"], cfg, mean=[0] * 3,
                             std=[1] * 3, class_names=[])
  assert ("the segvit-official layout cannot express this model: backbone.cls_in_blocks=True "
          "(the release: False)") in _error(capsys, other, tmp_path / "x.pth", "--to",
                                           "segvit-official")
  # Parameters no rule maps, named.
  flat = flax.traverse_util.flatten_dict(flax_model["params"], sep="/")
  flat["backbone/encoder_norm/scale"] = np.ones(64, np.float32)
  del flat["backbone/encoderblock_1/attn/key/kernel"]
  with pytest.raises(ValueError) as e:
    rules.to_theirs(flat, segvit_official.RULES[flax_model["kind"]], source="b",
                    layout="segvit-official")
  assert "unmapped (1): backbone/encoder_norm/scale" in str(e.value)
  assert ("incomplete packed groups (1): backbone/encoderblock_1/attn/query/kernel (needs "
          "backbone/encoderblock_1/attn/key/kernel)") in str(e.value)


def test_class_names_of_the_paper_configs():
  names = {c: whole_model.class_names(config_utils.load_config(f"{ROOT}/configs/{c}.py"))
           for c in ("segvit_vit_l16_ade20k", "segvit_shrunk_vit_l16_cocostuff10k",
                     "segvit_vit_l16_pascal_context")}
  assert len(names["segvit_vit_l16_ade20k"]) == 150 and names["segvit_vit_l16_ade20k"][0] == "wall"
  assert len(names["segvit_shrunk_vit_l16_cocostuff10k"]) == 171
  assert len(names["segvit_vit_l16_pascal_context"]) == 60


def test_official_table_is_one_to_one():
  """Every rule maps back to itself (templates and transforms are inverses), on shapes that
  tell q, k and v apart."""
  rng = np.random.default_rng(0)
  for kind, table in segvit_official.RULES.items():
    for rule in table:
      fields = {"i": 3, "s": 1, "j": 2}
      key = rules.format_key(rule.theirs, fields)
      assert rules.parse_key(rule.theirs, key) == {
          f: v for f, v in fields.items() if "{" + f in rule.theirs}, (kind, key)
      shape = {"backbone.patch_embed.projection.weight": (12, 3, 2, 2)}.get(
          key, (12, 4) if key.endswith("weight") else (12,))
      x = rng.standard_normal(shape).astype(np.float32)
      ours = rules.to_ours({key: x}, table, source=kind, layout="segvit-official")
      back = rules.to_theirs(ours, table, source=kind, layout="segvit-official")
      assert list(back) == [key] and np.array_equal(back[key], x), (kind, key)
