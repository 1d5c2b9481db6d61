"""Converters against their references: randomly initialised transformers ViTModel,
Dinov2Model (plain and SwiGLU) and Dinov2WithRegistersModel, saved with `save_pretrained` and
rewritten by tests/checkpoint_writers.py (written from the layout descriptions, independently
of the converters) as AugReg .npz (five flavours), timm .safetensors / .pth and original DINOv2
.pth (plain and chunked). Each file is converted to a bundle and `backbone_features` is compared
with the reference's hidden states (float64 torch) at the stored grid and at a non-square size
where the position embedding is interpolated.
"""

from __future__ import annotations

import os
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest
import torch
import transformers

import segvit_jax
from segvit_jax import bundle, convert, trainer
from segvit_jax.models import layers

from tests import checkpoint_writers as writers
from tests import support

D, DEPTH, HEADS, PATCH, IMAGE = 64, 3, 4, 8, 48  # stored grid 6x6
SIZES = {"native": (48, 48), "wide": (40, 64)}  # 6x6; 5x8: down in H, up in W
TOL = 1e-4
ROOT = support.ROOT


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Random values everywhere (init leaves LayerNorm at 1/0 and LayerScale constant)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
  return model.eval()


def _hf_model(kind: str):
  common = dict(hidden_size=D, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                image_size=IMAGE, patch_size=PATCH, layer_norm_eps=1e-6,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  if kind == "vit":
    return transformers.ViTModel(transformers.ViTConfig(intermediate_size=4 * D, **common),
                                 add_pooling_layer=False)
  if kind in ("dinov2", "dinov2_swiglu"):
    return transformers.Dinov2Model(transformers.Dinov2Config(
        use_swiglu_ffn=kind == "dinov2_swiglu", **common))
  if kind == "dinov2_reg":
    return transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
        num_register_tokens=4, **common))
  raise ValueError(kind)


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
  """kind -> (save_pretrained dir, saved state dict, float64 reference features per size)."""
  root = tmp_path_factory.mktemp("hf")
  out = {}
  for seed, kind in enumerate(("vit", "dinov2", "dinov2_swiglu", "dinov2_reg")):
    model = _perturb(_hf_model(kind), seed)
    path = str(root / kind)
    model.save_pretrained(path)
    sd = writers.hf_saved_state_dict(model)
    model = model.double()
    n_prefix = 1 + (4 if kind == "dinov2_reg" else 0)
    feats = {}
    for name, (h, w) in SIZES.items():
      x = _images(h, w)
      with torch.no_grad():
        kwargs = {"interpolate_pos_encoding": True} if kind == "vit" else {}
        o = model(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2).double(),
                  output_hidden_states=True, **kwargs)
      grid = lambda t: t[:, n_prefix:].reshape(2, h // PATCH, w // PATCH, D).numpy()  # noqa
      feats[name] = {"blocks": [grid(t) for t in o.hidden_states[1:]],
                     "normed": grid(o.last_hidden_state)}
    out[kind] = (path, sd, feats)
  return out


def _images(h: int, w: int) -> np.ndarray:
  return np.random.default_rng(h * 1000 + w).standard_normal((2, h, w, 3)).astype(np.float32)


def _max_diffs(b, want) -> dict[str, float]:
  diffs = {}
  for name, (h, w) in SIZES.items():
    got = segvit_jax.backbone_features(b, _images(h, w))
    assert len(got["blocks"]) == DEPTH
    diffs[name] = max(float(np.max(np.abs(np.asarray(g) - r)))
                      for g, r in zip([*got["blocks"], got["normed"]],
                                      [*want[name]["blocks"], want[name]["normed"]]))
  return diffs


def _write(tmp_path, kind_sd, fmt: str, flavour: str) -> str:
  """Writes the foreign file for a (format, flavour); returns its path."""
  kind, sd = kind_sd
  if fmt == "augreg-npz":
    path = str(tmp_path / f"{flavour}.npz")
    writers.save_npz(path, writers.augreg_npz_from_hf_vit(sd, flavour=flavour, num_heads=HEADS))
  elif fmt == "timm":
    tensors = (writers.timm_from_hf_vit(sd) if kind == "vit" else
               writers.timm_from_hf_dinov2(sd))
    path = str(tmp_path / f"timm.{flavour}")
    (writers.save_safetensors if flavour == "safetensors" else writers.save_torch)(path, tensors)
  elif fmt == "dinov2":
    path = str(tmp_path / "dinov2.pth")
    writers.save_torch(path, writers.dinov2_from_hf_dinov2(sd, chunks=3 if flavour == "chunked"
                                                           else 0))
  else:
    raise ValueError(fmt)
  return path


# (format, reference model, flavour, posemb_resize matching the reference or None = default)
CASES = [
    ("hf-vit", "vit", "", None),
    *[("augreg-npz", "vit", f, None)
      for f in ("prelinen", "per_type", "params", "params_img_posemb", "stacked")],
    ("timm", "vit", "safetensors", "bicubic"),  # timm's own default is bicubic_antialias
    ("timm", "vit", "pth", "bicubic"),
    ("hf-dinov2", "dinov2", "", None),
    ("hf-dinov2", "dinov2_swiglu", "", None),
    ("hf-dinov2", "dinov2_reg", "", None),
    ("timm", "dinov2", "safetensors", "bicubic"),
    ("timm", "dinov2_swiglu", "pth", "bicubic"),
    ("timm", "dinov2_reg", "safetensors", None),  # timm and HF registers: bicubic antialias
    ("dinov2", "dinov2", "plain", "bicubic"),  # the release's own: bicubic_dinov2 (0.1 offset)
    ("dinov2", "dinov2_swiglu", "chunked", "bicubic"),
    ("dinov2", "dinov2_reg", "plain", None),
]


@pytest.mark.parametrize("fmt,kind,flavour,posemb_resize", CASES)
def test_converted_features_match_reference(refs, tmp_path, fmt, kind, flavour, posemb_resize):
  hf_dir, sd, feats = refs[kind]
  src = hf_dir if fmt.startswith("hf-") else _write(tmp_path, (kind, sd), fmt, flavour)
  heads = HEADS if fmt in ("timm", "dinov2") else None  # the only layouts without it
  path = convert.convert(src, str(tmp_path / "bundle"), fmt, posemb_resize=posemb_resize,
                         num_heads=heads)
  b = segvit_jax.load_bundle(path)
  cfg = b.config.model.backbone
  assert (cfg.width, cfg.depth, cfg.num_heads, cfg.patch_size) == (D, DEPTH, HEADS, PATCH)
  assert tuple(cfg.posemb_grid) == (6, 6)
  assert cfg.num_registers == (4 if kind == "dinov2_reg" else 0)
  assert cfg.ffn == ("swiglu" if kind == "dinov2_swiglu" else "mlp")
  diffs = _max_diffs(b, feats)
  print(fmt, kind, flavour, {k: f"{v:.1e}" for k, v in diffs.items()})
  # Measured: <= 2.3e-5 (ViT, DINOv2, registers), 4.0e-5 (SwiGLU) at both sizes, with
  # features up to ~44 in magnitude: float32 rounding (~1e-6 relative).
  assert max(diffs.values()) < TOL, diffs


def test_dinov2_release_interpolation_differs_from_transformers(refs, tmp_path):
  """The original DINOv2 code interpolates with a 0.1 offset on the scale factor; transformers'
  Dinov2Model does not. Our default for the release format is the release's method, so at a
  non-native size it differs from transformers by a measurable amount, and at the native size
  not at all."""
  _, sd, feats = refs["dinov2"]
  src = _write(tmp_path, ("dinov2", sd), "dinov2", "plain")
  b = segvit_jax.load_bundle(convert.convert(src, str(tmp_path / "b"), "dinov2",
                                                   num_heads=HEADS))
  assert b.config.model.backbone.posemb_resize == "bicubic_dinov2"
  diffs = _max_diffs(b, feats)
  print({k: f"{v:.1e}" for k, v in diffs.items()})
  assert diffs["native"] < TOL
  assert diffs["wide"] > 1e-2  # measured 0.54 with these random weights


def test_image_size_resamples_the_stored_grid(refs, tmp_path):
  """Converting for another image size stores the resized grid: features at that size are
  those of the unconverted model resizing on the fly (the same resize, done once)."""
  hf_dir, _, feats = refs["dinov2_reg"]
  b = segvit_jax.load_bundle(convert.convert(hf_dir, str(tmp_path / "b"), "hf-dinov2",
                                             image_size=(40, 64)))
  assert tuple(b.config.model.backbone.posemb_grid) == (5, 8)
  got = segvit_jax.backbone_features(b, _images(40, 64))
  assert float(np.max(np.abs(np.asarray(got["normed"]) - feats["wide"]["normed"]))) < TOL


def test_patch_resize_keeps_tokens_of_resized_images(refs, tmp_path):
  """FlexiViT end to end: a 14 -> 16 style change (8 -> 12 here). Upsampling every patch of an
  image with the same resize and embedding it with the resampled kernel gives the original
  patch embeddings."""
  hf_dir, _, _ = refs["vit"]
  conv = convert.load(hf_dir, "hf-vit", patch_size=12, patch_resize="bilinear")
  assert conv.params["embedding/kernel"].shape == (12, 12, 3, D)
  assert conv.backbone["patch_size"] == 12
  original = convert.load(hf_dir, "hf-vit")
  x = _images(48, 48)[0].reshape(6, 8, 6, 8, 3).transpose(0, 2, 1, 3, 4)  # (6, 6, 8, 8, 3)
  m = layers.resize_matrix(8, 12, "bilinear")
  x12 = np.einsum("ai,bj,pqijc->pqabc", m, m, x)
  tok8 = np.einsum("pqijc,ijcd->pqd", x, original.params["embedding/kernel"])
  tok12 = np.einsum("pqijc,ijcd->pqd", x12, conv.params["embedding/kernel"])
  assert float(np.max(np.abs(tok8 - tok12))) < 1e-4 * max(1.0, float(np.max(np.abs(tok8))))


# ----------------------------------------------------------------------------------------------
# Errors name the keys

def test_missing_tensor_is_named(refs, tmp_path):
  _, sd, _ = refs["vit"]
  tensors = writers.timm_from_hf_vit(sd)
  del tensors["blocks.1.attn.proj.weight"]
  path = str(tmp_path / "broken.safetensors")
  writers.save_safetensors(path, tensors)
  with pytest.raises(ValueError, match=r"missing \(1\): encoderblock_1/attn/out/kernel"):
    convert.load(path, "timm", num_heads=HEADS)


def test_checkpoint_of_another_model_is_refused(refs, tmp_path):
  _, sd, _ = refs["vit"]
  tensors = writers.timm_from_hf_vit(sd)
  tensors["decode_head.conv_seg.weight"] = np.zeros((150, 64, 1, 1), np.float32)
  path = str(tmp_path / "segmentor.safetensors")
  writers.save_safetensors(path, tensors)
  with pytest.raises(ValueError, match=r"not a timm ViT checkpoint: 1 tensor\(s\) this layout "
                                       r"does not have: decode_head\.conv_seg\.weight"):
    convert.load(path, "timm", num_heads=HEADS)
  with pytest.raises(ValueError, match="model_type='vit'; this format reads dinov2"):
    convert.load(refs["vit"][0], "hf-dinov2")


def test_pickled_objects_are_refused_unless_trusted(refs, tmp_path):
  _, sd, feats = refs["dinov2"]
  path = str(tmp_path / "with_meta.pth")
  writers.save_pickle_with_object(path, writers.dinov2_from_hf_dinov2(sd))
  with pytest.raises(ValueError, match=r"weights_only=True.*--trust-pickle"):
    convert.load(path, "dinov2", num_heads=HEADS)
  conv = convert.load(path, "dinov2", num_heads=HEADS, trust_pickle=True)
  assert conv.backbone["depth"] == DEPTH


def test_cli_converts_and_reports(refs, tmp_path):
  _, sd, _ = refs["dinov2_reg"]
  src = _write(tmp_path, ("dinov2_reg", sd), "dinov2", "plain")
  out = str(tmp_path / "bundle")
  proc = subprocess.run(
      [sys.executable, "-m", "segvit_jax.convert", src, out, "--from", "dinov2",
       "--image-size", "64", "--patch-size", "16", "--num-heads", str(HEADS)], cwd=ROOT,
      capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "patch 16 grid (4, 4) registers 4 posemb_resize bicubic_antialias" in proc.stdout
  meta = bundle.read_config(out)
  assert meta["model"]["name"] == "vit" and meta["source_format"] == "dinov2"
  proc = subprocess.run(
      [sys.executable, "-m", "segvit_jax.convert", src + ".missing", out + "_2", "--from",
       "dinov2"],
      cwd=ROOT, capture_output=True, text=True, check=False)
  assert proc.returncode == 1 and "with_meta" not in proc.stderr
  assert f"{src}.missing does not exist" in proc.stderr


# ----------------------------------------------------------------------------------------------
# Starting a segmentor from pretrained weights

def _smoke_config(**overrides):
  from configs import demo  # pylint: disable=g-import-not-at-top
  c = demo.get_config("smoke")
  c.model.backbone.update(width=D, depth=DEPTH, num_heads=HEADS, mlp_dim=4 * D)
  c.model.head.update(tap_layers=(0, 2))
  c.update(overrides)
  return c


def test_model_init_loads_backbone_into_segvit(refs, tmp_path):
  """A timm file as `config.model_init`: after one step at lr 0 the checkpointed backbone is
  exactly the converted weights resized to the model's 4x4 grid, without the final norm."""
  _, sd, _ = refs["vit"]
  src = _write(tmp_path, ("vit", sd), "timm", "safetensors")
  c = _smoke_config(model_init=src, model_init_format="timm", total_steps=1, ckpt_every=1,
                    log_every=1)
  c.optim.lr = 0.0
  trainer.train(c, str(tmp_path / "run"))
  from segvit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  params, _ = checkpoint.restore_params(str(tmp_path / "run" / "checkpoints"), 1)
  got = flax.traverse_util.flatten_dict(params["backbone"], sep="/")
  want = convert.load(src, "timm", num_heads=HEADS, image_size=32,
                      posemb_resize="bicubic").params  # SegViT's method
  assert "encoder_norm/scale" in want and "encoder_norm/scale" not in got
  assert set(got) == set(want) - {"encoder_norm/scale", "encoder_norm/bias"}
  assert max(float(np.max(np.abs(np.asarray(got[k]) - want[k]))) for k in got) == 0.0


def test_model_init_mismatch_lists_keys(refs, tmp_path):
  _, sd, _ = refs["dinov2_reg"]
  src = _write(tmp_path, ("dinov2_reg", sd), "timm", "safetensors")
  c = _smoke_config()
  model = trainer.build_model(c.model)
  params = bundle.abstract_variables(model, c.model)["params"]
  with pytest.raises(ValueError) as e:
    convert.init_params(params, c.model, src, "timm")
  msg = str(e.value)
  assert "unexpected (7): encoderblock_0/ls1, encoderblock_0/ls2" in msg and "registers" in msg
  with pytest.raises(FileNotFoundError, match="model_init .*nope.npz does not exist"):
    convert.init_params(params, c.model, str(tmp_path / "nope.npz"), "augreg-npz")


def test_sharded_hf_directory_and_bf16_safetensors(refs, tmp_path):
  """Large HF models are saved in shards (model.safetensors.index.json); released timm files
  may be bf16: both read to the same parameters (bf16 up to its rounding)."""
  model = _perturb(_hf_model("vit"), 7)
  model.save_pretrained(str(tmp_path / "one"))
  model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="100KB")
  assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
  one = convert.load(str(tmp_path / "one"), "hf-vit").params
  sharded = convert.load(str(tmp_path / "sharded"), "hf-vit").params
  assert set(one) == set(sharded)
  assert all(np.array_equal(one[k], sharded[k]) for k in one)

  import safetensors.torch  # pylint: disable=g-import-not-at-top
  tensors = writers.timm_from_hf_vit(writers.hf_saved_state_dict(model))
  path = str(tmp_path / "bf16.safetensors")
  safetensors.torch.save_file({k: torch.from_numpy(v).bfloat16() for k, v in tensors.items()},
                              path)
  bf16 = convert.load(path, "timm", num_heads=HEADS).params
  rel = max(float(np.max(np.abs(bf16[k] - one[k]))) / float(np.max(np.abs(one[k])))
            for k in one)
  assert bf16["embedding/kernel"].dtype == np.float32 and 0 < rel < 2**-8


def test_wrong_file_type_is_explained(refs, tmp_path):
  path = str(tmp_path / "weights.npz")
  with open(path, "wb") as f:
    f.write(b"not an archive")
  with pytest.raises(ValueError, match=r"weights\.npz is not a readable \.npz archive"):
    convert.load(path, "augreg-npz")


def test_backbone_bundle_as_model_init_and_features_of_a_segmentor(refs, tmp_path, caplog):
  """A converted backbone bundle initialises a SegViT like the raw file does; the features
  API also reads a whole-model bundle's backbone; predict refuses a backbone bundle."""
  _, sd, _ = refs["vit"]
  src = _write(tmp_path, ("vit", sd), "timm", "pth")
  bundle_path = convert.convert(src, str(tmp_path / "bb"), "timm", num_heads=HEADS)
  c = _smoke_config()
  model = trainer.build_model(c.model)
  init = bundle.abstract_variables(model, c.model)["params"]
  from_file = convert.init_params(init, c.model, src, "timm")
  with caplog.at_level("WARNING"):
    from_bundle = convert.init_params(init, c.model, bundle_path, "bundle", mean=(0.0,) * 3,
                                      std=(1.0,) * 3)
  assert "expects pixel mean (127.5, 127.5, 127.5) but the config uses (0.0, 0.0, 0.0)" in \
      caplog.text
  a, b = (flax.traverse_util.flatten_dict(p["backbone"], sep="/") for p in (from_file,
                                                                            from_bundle))
  assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)

  seg = bundle.save_bundle(str(tmp_path / "seg"), {**from_file, "head": jax.tree.map(
      lambda x: np.zeros(x.shape, x.dtype), from_file["head"])}, c.model, mean=c.mean,
                           std=c.std, class_names=[str(i) for i in range(6)])
  x = _images(32, 32)
  feats = segvit_jax.backbone_features(seg, x)
  assert set(feats) == {"blocks"} and len(feats["blocks"]) == DEPTH  # SegViT: no final norm
  # The segmentor drops the cls token before the blocks; the backbone bundle keeps it.
  assert feats["blocks"][0].shape == (2, 4, 4, D)
  with pytest.raises(ValueError, match="backbone bundle .* use segvit_jax.backbone_features"):
    segvit_jax.load_bundle(bundle_path).predict(np.zeros((1, 32, 32, 3), np.uint8))
