"""DINOv3 ViT checkpoints (Simeoni et al. 2025) in the two published layouts:

`--from dinov3`: the facebookresearch/dinov3 release's state dicts
(`dinov3_vit{s16,s16plus,b16,l16,h16plus,7b16}_pretrain_lvd1689m-HASH.pth`), the layout of its
models/vision_transformer.py: `cls_token`, `storage_tokens` (the registers), `mask_token`
(dropped), `patch_embed.proj`, `rope_embed.periods` (the RoPE periods, a buffer: they give the
head dimension, hence the head count, and the base, which is checked), blocks
`blocks.{i}.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp, ls2.gamma}` with q, k, v packed
in `attn.qkv` and its bias multiplied by `attn.qkv.bias_mask` (`LinearKMaskedBias`, the
release's `mask_k_bias`: ones for q and v, zeros for k, so the key has no bias), the FFN as
`mlp.fc1 / fc2` (GELU) or `mlp.w1 / w2 / w3` (SwiGLU), and the final `norm`. The 7B model has
no qkv bias; its `local_cls_norm` (used only on local crops in training) is dropped. LayerNorm
eps 1e-5: every released ViT uses the release's "layernormbf16" norm.

`--from hf-dinov3`: a transformers `DINOv3ViTModel` (or `DINOv3ViTBackbone`) `save_pretrained`
directory (e.g. facebook/dinov3-vitl16-pretrain-lvd1689m): `embeddings.{cls_token,
register_tokens, patch_embeddings}`, `layer.{i}.{norm1, attention.{q,k,v,o}_proj,
layer_scale1.lambda1, norm2, mlp.{up,down}_proj | mlp.{gate,up,down}_proj,
layer_scale2.lambda1}`, `norm`; sizes, biases, eps, RoPE base and its training-time coordinate
augmentations from config.json.

Neither layout has a position table: the bundle's ViT computes RoPE for every input grid.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from segvit_jax import bundle as bundle_lib
from segvit_jax.convert.backbone import IMAGENET_MEAN_STD, Converted, infer_backbone, \
    read_bundle
from segvit_jax.convert.rules import KeyRule, attention, conv, hf_mean_std, hf_unsupported, \
    linear, mlp, norm, read_hf_model_dir, read_torch, strip_prefix, swiglu, to_ours

# What the release's hub/backbones.py builds every released ViT with.
ROPE_THETA = 100.0
RELEASE_ROPE = dict(rope_shift=None, rope_jitter=None, rope_rescale=2.0)
NORM_EPS = 1e-5
# The RoPE fields of a DINOv3 ViT config (what a file of weights alone does not record).
ROPE_FIELDS = ("rope_theta", "norm_eps", "rope_shift", "rope_jitter", "rope_rescale")
# The heads of the released widths (hub/backbones.py: S / S+ 6, B 12, L / L+ 16, H+ 20, 7B 32),
# for layouts that store attention as (D, D) matrices; the weights for the hub names by width
# (the S, B and L of EoMT's DINOv3 model zoo; H+ and 7B).
HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1280: 20, 4096: 32}
RELEASE_NAMES = {384: "vits16", 768: "vitb16", 1024: "vitl16", 1280: "vith16plus", 4096: "vit7b16"}


def _qv_of_qkv(bias):
  """A (masked) packed qkv bias (3D,) -> our query and value biases (the key has none)."""
  q, _, v = np.split(bias, 3)
  return q, v


def _qkv_of_qv(q, v):
  """Inverse of `_qv_of_qkv`: the key's third is zero, as the release's mask makes it."""
  return np.concatenate([q, np.zeros_like(q), v])


def _release_block(theirs: str, ours: str, ffn: str) -> tuple[KeyRule, ...]:
  return (*norm(theirs + "norm1", ours + "norm1"),
          KeyRule(theirs + "attn.qkv.weight", tuple(f"{ours}attn/{n}/kernel"
                                                    for n in ("query", "key", "value")),
                  lambda w: [p.T for p in np.split(w, 3)],
                  lambda *ps: np.concatenate([p.T for p in ps])),
          KeyRule(theirs + "attn.qkv.bias", (ours + "attn/query/bias", ours + "attn/value/bias"),
                  _qv_of_qkv, _qkv_of_qv),
          *linear(theirs + "attn.proj", ours + "attn/out"),
          KeyRule(theirs + "ls1.gamma", ours + "ls1"),
          *norm(theirs + "norm2", ours + "norm2"),
          *(mlp(theirs + "mlp.", ours + "mlp") if ffn == "mlp" else
            swiglu(theirs + "mlp.", ours + "mlp", ("w1", "w2", "w3"))),
          KeyRule(theirs + "ls2.gamma", ours + "ls2"))


RELEASE_RULES = {ffn: (KeyRule("cls_token", "cls"), KeyRule("storage_tokens", "registers"),
                       *conv("patch_embed.proj", "embedding"), *norm("norm", "encoder_norm"),
                       *_release_block("blocks.{i}.", "encoderblock_{i}/", ffn))
                 for ffn in ("mlp", "swiglu")}
# `bias_mask` and `periods` are read apart (`_masked_qkv_bias`, `_rope_heads`) and removed.
RELEASE_DROPPED = ("mask_token", r"local_cls_norm\.(weight|bias)")


def _masked_qkv_bias(tensors: dict[str, np.ndarray], source: str) -> None:
  """Applies each `attn.qkv.bias_mask` to its bias (in place, the masks removed) and checks
  that the key's third of every qkv bias is then zero: DINOv3 has no key bias."""
  for key in [k for k in tensors if k.endswith("attn.qkv.bias_mask")]:
    mask = tensors.pop(key)
    bias_key = key[:-len("_mask")]
    if bias_key not in tensors:
      raise ValueError(f"{source}: {key} without {bias_key}")
    tensors[bias_key] = tensors[bias_key] * mask
  for key in [k for k in tensors if k.endswith("attn.qkv.bias")]:
    k_bias = np.split(tensors[key], 3)[1]
    if np.any(k_bias != 0):
      raise ValueError(f"{source}: {key} has a non-zero key part (max |b| "
                       f"{float(np.max(np.abs(k_bias))):.3g}) and no bias_mask zeroing it; "
                       "DINOv3 ViTs (mask_k_bias=True) have no key bias")


def _rope_heads(tensors: dict[str, np.ndarray], width: int, source: str) -> int:
  """The head count the `rope_embed.periods` buffer implies (head_dim / 4 periods); checks
  that they are the base-100 periods 100 ** (4 j / head_dim) of every released ViT."""
  key = "rope_embed.periods"
  if key not in tensors:
    raise ValueError(f"{source}: no {key!r}; is this a DINOv3 ViT checkpoint of the "
                     "facebookresearch/dinov3 release?")
  periods = np.asarray(tensors.pop(key), np.float64)
  head_dim = 4 * periods.shape[0]
  want = ROPE_THETA ** (4.0 * np.arange(periods.shape[0]) / head_dim)
  if periods.ndim != 1 or width % head_dim or not np.allclose(periods, want, rtol=1e-5):
    raise ValueError(f"{source}: {key} {periods.shape} {np.round(periods[:4], 4).tolist()}... "
                     f"are not the RoPE periods {ROPE_THETA:g} ** (4 j / head_dim) of a width "
                     f"{width} ViT (the min / max period form is not supported)")
  return width // head_dim


def _ffn(tensors: Mapping[str, np.ndarray]) -> str:
  return "swiglu" if "blocks.0.mlp.w1.weight" in tensors else "mlp"


def vit_fields(params: Mapping[str, np.ndarray], **fields: Any) -> dict[str, Any]:
  """The DINOv3 ViT fields every layout shares (biases from the converted `params`), updated
  with the layout's `fields`."""
  return {"rope_theta": ROPE_THETA, "norm_eps": NORM_EPS, "posemb_grid": (14, 14),
          "qkv_bias": "encoderblock_0/attn/query/bias" in params,
          "key_bias": "encoderblock_0/attn/key/bias" in params, **fields}


def load(path: str, *, num_heads: int | None = None, trust_pickle: bool = False,
         **unused) -> Converted:
  """A facebookresearch/dinov3 ViT state dict (.pth) -> our ViT (`num_heads` overrides the
  count the RoPE periods imply)."""
  del unused
  tensors = read_torch(path, trust_pickle=trust_pickle)
  if "patch_embed.proj.weight" not in tensors:
    raise ValueError(f"{path} is not a DINOv3 ViT checkpoint: no 'patch_embed.proj.weight'")
  heads = _rope_heads(tensors, tensors["patch_embed.proj.weight"].shape[0], path)
  _masked_qkv_bias(tensors, path)
  params = to_ours(tensors, RELEASE_RULES[_ffn(tensors)], source=path, layout="DINOv3",
                   dropped=RELEASE_DROPPED, model="ViT")
  cfg = infer_backbone(params, num_heads=num_heads or heads, source=path,
                       **vit_fields(params, **RELEASE_ROPE))
  return Converted(params, cfg, *IMAGENET_MEAN_STD)


# ----------------------------------------------------------------------------------------------
# transformers DINOv3ViTModel

def hf_rules(ffn: str, *, embeddings: str = "embeddings.", layer: str = "layer.{i}.",
             final_norm: str = "norm", ours: str = "") -> tuple[KeyRule, ...]:
  """DINOv3ViTModel's names (`ffn`: "mlp" or "swiglu", the gated MLP) <-> our ViT under
  `ours`. The prefixes of its modules are arguments: the EoMT release keeps the module under
  other attribute names (`convert/eomt.py`, `official_dinov3_rules`)."""
  lay, o = layer, ours + "encoderblock_{i}/"
  return (
      KeyRule(embeddings + "cls_token", ours + "cls"),
      KeyRule(embeddings + "register_tokens", ours + "registers"),
      *conv(embeddings + "patch_embeddings", ours + "embedding"),
      *norm(lay + "norm1", o + "norm1"),
      *attention(lay + "attention.", o + "attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
      KeyRule(lay + "layer_scale1.lambda1", o + "ls1"),
      *norm(lay + "norm2", o + "norm2"),
      KeyRule(lay + "layer_scale2.lambda1", o + "ls2"),
      *norm(final_norm, ours + "encoder_norm"),
      *(mlp(lay + "mlp.", o + "mlp", ("up_proj", "down_proj")) if ffn == "mlp" else
        swiglu(lay + "mlp.", o + "mlp", ("gate_proj", "up_proj", "down_proj"))),
  )


HF_RULES = {ffn: hf_rules(ffn) for ffn in ("mlp", "swiglu")}
HF_DROPPED = (r"embeddings\.mask_token",)


def check_hf_config(config: Mapping[str, Any], path: str) -> None:
  """What our DINOv3 ViT cannot run in a transformers DINOv3 config.json (DINOv3ViTModel's or
  EomtDinov3's) fails, named: the activation of its MLP, channels, unequal q / v biases."""
  gated = bool(config.get("use_gated_mlp", False))
  # The gated MLP is our SwiGLU only with SiLU; the plain one is our exact-GELU MLP.
  act = "silu" if gated else "gelu"
  bad = hf_unsupported({**config, "hidden_act": "gelu"})  # (the activation is checked here)
  if config.get("hidden_act", "gelu") != act:
    bad["hidden_act"] = config["hidden_act"]
  if config.get("query_bias", True) != config.get("value_bias", True):
    bad.update(query_bias=config.get("query_bias"), value_bias=config.get("value_bias"))
  if bad:
    raise ValueError(f"{path}/config.json: {bad} not supported (expected hidden_act "
                     f"{act!r} with use_gated_mlp={gated}, 3 channels, equal query_bias and "
                     "value_bias)")


def hf_vit_fields(config: Mapping[str, Any], params: Mapping[str, np.ndarray]
                  ) -> dict[str, Any]:
  """`vit_fields` of a transformers DINOv3 config.json: RoPE base (DINOv3ViTModel's
  `rope_theta`, EomtDinov3's `rope_parameters.rope_theta`), its training-time coordinate
  augmentations, eps, the grid of `image_size` (informational)."""
  theta = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta"))
  patch, size = (np.broadcast_to(config.get(k, d), (2,)).astype(int)
                 for k, d in (("patch_size", 16), ("image_size", 224)))
  return vit_fields(params, rope_theta=float(ROPE_THETA if theta is None else theta),
                    norm_eps=config.get("layer_norm_eps", NORM_EPS),
                    posemb_grid=tuple(int(g) for g in size // patch),
                    rope_shift=config.get("pos_embed_shift"),
                    rope_jitter=config.get("pos_embed_jitter"),
                    rope_rescale=config.get("pos_embed_rescale"))


def load_hf(path: str, *, num_heads: int | None = None, trust_pickle: bool = False,
            **unused) -> Converted:
  """A transformers DINOv3ViTModel directory -> our ViT."""
  del unused
  config, tensors = read_hf_model_dir(path, "dinov3_vit", fmt="hf-dinov3",
                                      name="DINOv3ViTModel", trust_pickle=trust_pickle)
  check_hf_config(config, path)
  # save_pretrained writes `layer.{i}`; the module's own state dict has `model.layer.{i}`.
  tensors = strip_prefix(tensors, ["model."])
  params = to_ours(tensors, HF_RULES["swiglu" if config.get("use_gated_mlp") else "mlp"],
                   source=path, layout="HF dinov3_vit", dropped=HF_DROPPED, model="ViT")
  cfg = infer_backbone(params, num_heads=num_heads or config["num_attention_heads"],
                       source=path, **hf_vit_fields(config, params))
  return Converted(params, cfg, *hf_mean_std(path, IMAGENET_MEAN_STD))



def read_backbone(path: str, *, trust_pickle: bool = False) -> Converted:
  """A DINOv3 ViT in any of its forms: a transformers DINOv3ViTModel directory (`load_hf`),
  one of our backbone bundles (converted from either layout), or the release's .pth (`load`).
  What is not a DINOv3 ViT (no rotary position embeddings) fails, named."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist (a DINOv3 ViT: the facebookresearch/dinov3 "
                            ".pth, a DINOv3ViTModel directory or a backbone bundle)")
  if bundle_lib.is_bundle(path):
    conv = read_bundle(path)
  elif os.path.isdir(path):
    conv = load_hf(path, trust_pickle=trust_pickle)
  else:
    conv = load(path, trust_pickle=trust_pickle)
  if conv.backbone.get("rope_theta") is None:
    raise ValueError(f"{path} is not a DINOv3 ViT: its backbone has a learned position table, "
                     "no rotary position embeddings")
  return conv
