"""DINOv3 converters against transformers' DINOv3ViTModel: small random models (4 registers,
LayerScale, every tensor perturbed so that LayerScale, biases and norms are not trivial), one
with the GELU MLP and one with the gated MLP and no qkv bias (the 7B's form), saved with
`save_pretrained` (`--from hf-dinov3`) and rewritten in the facebookresearch/dinov3 layout by
tests/checkpoint_writers.py (`--from dinov3`: packed qkv with a masked, non-zero key bias,
`rope_embed.periods`, `storage_tokens`, the 7B's `local_cls_norm`). Each is converted through
the command line and `backbone_features` is compared with the reference's hidden states
(float64 torch) at the native grid and at non-square ones, where RoPE is recomputed.
"""

from __future__ import annotations

import flax
import jax
import numpy as np
import pytest
import torch
import transformers

import segvit_jax
from segvit_jax import convert, trainer

from tests import checkpoint_writers as writers
from tests import support

D, DEPTH, HEADS, PATCH, IMAGE, REGISTERS = 64, 3, 4, 16, 64, 4
SIZES = {"native": (64, 64), "wide": (48, 80), "tall": (80, 48)}  # 4x4, 3x5, 5x3
KINDS = {"mlp": dict(intermediate_size=4 * D),
         "gated": dict(intermediate_size=96, use_gated_mlp=True, hidden_act="silu",
                       query_bias=False, value_bias=False)}
TOL = 1e-4


def _hf_model(kind: str, seed: int) -> transformers.DINOv3ViTModel:
  config = transformers.DINOv3ViTConfig(
      hidden_size=D, num_hidden_layers=DEPTH, num_attention_heads=HEADS, patch_size=PATCH,
      image_size=IMAGE, num_register_tokens=REGISTERS, layer_norm_eps=1e-5, **KINDS[kind])
  model = transformers.DINOv3ViTModel(config)
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():  # init leaves norms at 1 / 0 and LayerScale constant
    for p in model.parameters():
      p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
  return model.eval()


def _images(h: int, w: int) -> np.ndarray:
  return np.random.default_rng(h * 1000 + w).standard_normal((2, h, w, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
  """kind -> (save_pretrained dir, saved state dict, float64 reference features per size)."""
  root = tmp_path_factory.mktemp("hf_dinov3")
  out = {}
  for seed, kind in enumerate(KINDS):
    model = _hf_model(kind, seed)
    path = str(root / kind)
    model.save_pretrained(path)
    sd = writers.hf_saved_state_dict(model)
    model = model.double()
    feats = {}
    for name, (h, w) in SIZES.items():
      with torch.no_grad():
        o = model(pixel_values=torch.from_numpy(_images(h, w)).permute(0, 3, 1, 2).double(),
                  output_hidden_states=True)
      grid = lambda t: t[:, 1 + REGISTERS:].reshape(2, h // PATCH, w // PATCH, D).numpy()  # noqa
      assert len(o.hidden_states) == DEPTH + 1  # the embeddings, then each layer
      feats[name] = {"blocks": [grid(t) for t in o.hidden_states[1:]],
                     "normed": grid(o.last_hidden_state)}
    out[kind] = (path, sd, feats)
  return out


def _max_diffs(b, want) -> dict[str, float]:
  diffs = {}
  for name, (h, w) in SIZES.items():
    got = segvit_jax.backbone_features(b, _images(h, w))
    assert len(got["blocks"]) == DEPTH
    diffs[name] = max(float(np.max(np.abs(np.asarray(g) - r)))
                      for g, r in zip([*got["blocks"], got["normed"]],
                                      [*want[name]["blocks"], want[name]["normed"]]))
  return diffs


def _release_file(tmp_path, sd, kind: str, **options) -> str:
  path = str(tmp_path / f"dinov3_{kind}.pth")
  writers.save_torch(path, writers.dinov3_from_hf_dinov3(
      sd, num_heads=HEADS, k_bias_noise=0.5, local_cls_norm=kind == "gated", **options))
  return path


@pytest.mark.parametrize("fmt", ["hf-dinov3", "dinov3"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_converted_features_match_transformers(refs, tmp_path, capsys, fmt, kind):
  hf_dir, sd, feats = refs[kind]
  src = hf_dir if fmt == "hf-dinov3" else _release_file(tmp_path, sd, kind)
  out = tmp_path / "bundle"
  printed = support.convert_ok(capsys, src, out, "--from", fmt)
  # The grid is informational with RoPE: transformers' image_size / patch, the release's 224 px.
  grid = (4, 4) if fmt == "hf-dinov3" else (14, 14)
  assert f"width {D} depth {DEPTH} patch {PATCH} grid {grid} registers 4 rope_theta 100" in \
      printed
  b = segvit_jax.load_bundle(str(out))
  cfg = b.config.model.backbone
  assert (cfg.width, cfg.depth, cfg.num_heads, cfg.patch_size) == (D, DEPTH, HEADS, PATCH)
  assert (cfg.rope_theta, cfg.num_registers, cfg.layerscale, cfg.norm_eps) == (
      100.0, REGISTERS, 1e-5, 1e-5)
  assert cfg.ffn == ("swiglu" if kind == "gated" else "mlp")
  assert (cfg.qkv_bias, cfg.key_bias) == (kind == "mlp", False)
  assert cfg.rope_rescale == 2.0 and cfg.rope_shift is None and cfg.rope_jitter is None
  assert "pos_embedding" not in b.variables["params"]
  diffs = _max_diffs(b, feats)
  print(fmt, kind, {k: f"{v:.1e}" for k, v in diffs.items()})
  # Measured (over runs: XLA's CPU reductions vary in order): <= 2.9e-5 (GELU MLP) and
  # <= 5.3e-5 (gated) at every size, with block outputs up to ~40 in magnitude: float32
  # rounding (~1.5e-6 relative).
  assert max(diffs.values()) < TOL, diffs


def test_both_layouts_give_the_same_parameters(refs, tmp_path):
  for kind in KINDS:
    hf_dir, sd, _ = refs[kind]
    a = convert.load(hf_dir, "hf-dinov3")
    b = convert.load(_release_file(tmp_path, sd, kind), "dinov3")
    assert set(a.params) == set(b.params)
    assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params)
    assert a.mean == b.mean and a.backbone.pop("posemb_grid") == (4, 4)
    assert a.backbone == {k: v for k, v in b.backbone.items() if k != "posemb_grid"}


def test_input_not_divisible_by_the_patch_is_refused(refs, tmp_path):
  """transformers silently drops the remainder of a 56 x 40 input at patch 16; we refuse."""
  b = segvit_jax.load_bundle(convert.convert(refs["mlp"][0], str(tmp_path / "b"), "hf-dinov3"))
  with pytest.raises(ValueError, match="input 56x40 is not divisible by the patch size 16"):
    segvit_jax.backbone_features(b, _images(56, 40))


def test_release_files_that_are_not_dinov3_vits_are_explained(refs, tmp_path):
  _, sd, _ = refs["mlp"]
  tensors = writers.dinov3_from_hf_dinov3(sd, num_heads=HEADS, k_bias_noise=0.5)
  cases = {
      "no_mask": ({k: v for k, v in tensors.items() if not k.endswith("bias_mask")},
                  r"blocks\.0\.attn\.qkv\.bias has a non-zero key part .* DINOv3 ViTs "
                  r"\(mask_k_bias=True\) have no key bias"),
      "periods": ({**tensors, "rope_embed.periods": tensors["rope_embed.periods"] * 1.1},
                  r"rope_embed\.periods \(4,\) .* are not the RoPE periods 100 \*\* "
                  r"\(4 j / head_dim\) of a width 64 ViT"),
      "no_periods": ({k: v for k, v in tensors.items() if k != "rope_embed.periods"},
                     "no 'rope_embed.periods'; is this a DINOv3 ViT checkpoint"),
      "untied_cls_norm": ({**tensors, "cls_norm.weight": tensors["norm.weight"]},
                          "is not a DINOv3 ViT checkpoint: 1 tensor.* cls_norm.weight"),
  }
  for name, (t, message) in cases.items():
    path = str(tmp_path / f"{name}.pth")
    writers.save_torch(path, t)
    with pytest.raises(ValueError, match=message):
      convert.load(path, "dinov3")


def test_unsupported_transformers_configs_are_explained(refs, tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  hf_dir = str(tmp_path / "gelu_gate")
  shutil.copytree(refs["gated"][0], hf_dir)
  with open(f"{hf_dir}/config.json") as f:
    config = json.load(f)
  with open(f"{hf_dir}/config.json", "w") as f:
    json.dump({**config, "hidden_act": "gelu"}, f)
  with pytest.raises(ValueError, match=r"config.json: \{'hidden_act': 'gelu'\} not supported "
                                       r"\(expected hidden_act 'silu' with use_gated_mlp=True"):
    convert.load(hf_dir, "hf-dinov3")
  with pytest.raises(ValueError, match="model_type='dinov3_vit'; --from hf-dinov2 reads|"
                                       "model_type='dinov3_vit'; this format reads dinov2"):
    convert.load(refs["mlp"][0], "hf-dinov2")


def test_model_init_loads_dinov3_into_segvit(refs, tmp_path):
  """A DINOv3 release file as a SegViT's `config.model_init`: the backbone is exactly the
  converted weights without the final norm (RoPE: no grid to resize)."""
  from configs import demo  # pylint: disable=g-import-not-at-top
  _, sd, _ = refs["mlp"]
  src = _release_file(tmp_path, sd, "mlp")
  c = demo.get_config("smoke")
  c.model.backbone.update(variant="dinov3-S/16", width=D, depth=DEPTH, num_heads=HEADS,
                          mlp_dim=4 * D, patch_size=PATCH)
  c.model.head.update(tap_layers=(0, 2))
  model = trainer.build_model(c.model)
  x = _images(64, 48)
  init = flax.linen.meta.unbox(jax.jit(model.init)(jax.random.key(0), x))["params"]
  params = convert.init_params(init, c.model, src, "dinov3")
  got = flax.traverse_util.flatten_dict(params["backbone"], sep="/")
  want = convert.load(src, "dinov3").params
  assert set(got) == set(want) - {"encoder_norm/scale", "encoder_norm/bias"}
  assert all(np.array_equal(np.asarray(got[k]), want[k]) for k in got)
  scores = model.apply({"params": params}, x)["semantic_scores"]
  assert scores.shape == (2, c.model.num_classes, 64, 48) and np.all(np.isfinite(scores))
