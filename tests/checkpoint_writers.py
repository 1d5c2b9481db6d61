"""Test-side writers of *foreign* checkpoint layouts (AugReg .npz, timm, DINOv2 and DINOv3
.pth), built from the weights of a randomly initialised HuggingFace model.

Written from the layout descriptions in the checkpoint spec (checkpoints.md), independently of the
library's converters, so that converter tests compare two independent readings of the spec.
Nothing here imports the library.

Inputs are HuggingFace state dicts as `save_pretrained` writes them (`model.safetensors`), as
numpy arrays. In transformers 5.x the in-memory `model.state_dict()` uses different names
(`attention.q_proj`, `mlp.gate_proj/up_proj/down_proj`, ViT `layers.{i}` ...) than the saved
file (`attention.attention.query`, `mlp.weights_in/weights_out`, `encoder.layer.{i}` ...), so
use `hf_saved_state_dict(model)`, which saves the model and reads the file back.

Layouts written (D = width, N = patches, R = registers, h = heads, hd = head_dim):
- `augreg_npz_from_hf_vit`: flat '/'-joined keys of the big_vision / vision_transformer .npz,
  in five flavours (pre-linen numbering, per-type numbering, `params/` nesting, big_vision
  `params/img/` with a cls-less `pos_embedding`, stacked blocks).
- `timm_from_hf_vit`, `timm_from_hf_dinov2`: timm state dicts (q/k/v packed as `attn.qkv`).
- `dinov2_from_hf_dinov2`: the facebookresearch DINOv2 .pth, optionally in `block_chunks` form.
- `dinov3_from_hf_dinov3`: the facebookresearch/dinov3 ViT .pth (packed, masked qkv bias).
Save helpers: `save_npz`, `save_torch`, `save_safetensors`, `save_pickle_with_object`.
"""

from __future__ import annotations

import os
import re
import tempfile

import numpy as np

AUGREG_FLAVOURS = ("prelinen", "per_type", "params", "params_img_posemb", "stacked")
NUM_HEAD_CLASSES = 10


# ----------------------------------------------------------------------------------------------
# Reading the HF side


def hf_saved_state_dict(model) -> dict[str, np.ndarray]:
  """The state dict `model.save_pretrained` writes, as numpy arrays (see the module docstring)."""
  from safetensors.numpy import load_file

  with tempfile.TemporaryDirectory() as d:
    model.save_pretrained(d, safe_serialization=True)
    path = os.path.join(d, "model.safetensors")
    if not os.path.exists(path):
      raise FileNotFoundError(f"expected a single-file checkpoint, got {sorted(os.listdir(d))}")
    return {k: np.array(v) for k, v in load_file(path).items()}


def _get(sd: dict, key: str) -> np.ndarray:
  if key not in sd:
    raise KeyError(f"{key!r} not in the HF state dict; writers expect the layout that "
                   "save_pretrained writes (use hf_saved_state_dict), got e.g. "
                   f"{sorted(sd)[:6]}")
  return np.ascontiguousarray(sd[key])


def _depth(sd: dict) -> int:
  idx = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layer\.(\d+)\.", k))}
  if not idx or idx != set(range(len(idx))):
    raise KeyError(f"no contiguous encoder.layer.{{i}} keys (got {sorted(idx)}); writers expect "
                   "the layout that save_pretrained writes (use hf_saved_state_dict)")
  return len(idx)


def _linear(sd: dict, name: str) -> tuple[np.ndarray, np.ndarray]:
  """A torch Linear (weight (out, in), bias (out,))."""
  return _get(sd, name + ".weight"), _get(sd, name + ".bias")


def _random_like_head(rng, d_in: int, d_out: int, dtype) -> tuple[np.ndarray, np.ndarray]:
  """A random (in, out) kernel and bias; for heads the converters must drop."""
  return (rng.normal(0.0, 0.02, (d_in, d_out)).astype(dtype),
          rng.normal(0.0, 0.02, (d_out,)).astype(dtype))


# ----------------------------------------------------------------------------------------------
# AugReg ViT .npz (big_vision / vision_transformer)


def augreg_npz_from_hf_vit(sd: dict, *, flavour: str, num_heads: int,
                           seed: int = 0) -> dict[str, np.ndarray]:
  """A HF ViTModel state dict as a flat AugReg .npz dict ('/'-joined keys).

  flavour:
    "prelinen": `embedding/{kernel (p,p,3,D), bias}`, `cls` (1,1,D),
      `Transformer/posembed_input/pos_embedding` (1,1+N,D), blocks
      `Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2,
      MlpBlock_3}`, `Transformer/encoder_norm`, random `head` (D,10) and `pre_logits` (D,D).
    "per_type": the same, blocks numbered per type (`LayerNorm_0, MultiHeadDotProductAttention_0,
      LayerNorm_1, MlpBlock_0`).
    "params": per_type nested under `params/`.
    "params_img_posemb": per_type under `params/img/`, the position embedding at
      `params/img/pos_embedding` (1,N,D) without the cls slot, and the cls position folded into
      the token (`cls = cls_token + position_embeddings[:, :1]`): functionally the same model.
    "stacked": per_type with the blocks stacked as `Transformer/encoderblock/...`, every block
      array with a leading depth axis.
  Attention kernels: `{query,key,value}/kernel` (D,h,hd), `/bias` (h,hd); `out/kernel` (h,hd,D),
  `out/bias` (D,). Dense kernels are (in, out); LayerNorm is `{scale, bias}`.
  """
  if flavour not in AUGREG_FLAVOURS:
    raise ValueError(f"flavour must be one of {AUGREG_FLAVOURS}, got {flavour!r}")
  depth = _depth(sd)
  cls = _get(sd, "embeddings.cls_token")
  pos = _get(sd, "embeddings.position_embeddings")
  d = cls.shape[-1]
  if d % num_heads:
    raise ValueError(f"width {d} is not divisible by num_heads={num_heads}")
  hd = d // num_heads
  conv_w, conv_b = _linear(sd, "embeddings.patch_embeddings.projection")

  if flavour == "prelinen":
    ln0, mha, ln1, mlp = ("LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2",
                          "MlpBlock_3")
  else:
    ln0, mha, ln1, mlp = ("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1",
                          "MlpBlock_0")

  out: dict[str, np.ndarray] = {}
  out["embedding/kernel"] = conv_w.transpose(2, 3, 1, 0)  # (D,3,p,p) -> (p,p,3,D)
  out["embedding/bias"] = conv_b
  if flavour == "params_img_posemb":
    out["cls"] = cls + pos[:, :1]
    out["pos_embedding"] = pos[:, 1:]
  else:
    out["cls"] = cls
    out["Transformer/posembed_input/pos_embedding"] = pos

  blocks = []
  for i in range(depth):
    p = f"encoder.layer.{i}."
    blk: dict[str, np.ndarray] = {}
    blk[f"{ln0}/scale"], blk[f"{ln0}/bias"] = _linear(sd, p + "layernorm_before")
    for name in ("query", "key", "value"):
      w, b = _linear(sd, p + f"attention.attention.{name}")
      blk[f"{mha}/{name}/kernel"] = w.T.reshape(d, num_heads, hd)
      blk[f"{mha}/{name}/bias"] = b.reshape(num_heads, hd)
    w, b = _linear(sd, p + "attention.output.dense")
    blk[f"{mha}/out/kernel"] = w.T.reshape(num_heads, hd, d)
    blk[f"{mha}/out/bias"] = b
    blk[f"{ln1}/scale"], blk[f"{ln1}/bias"] = _linear(sd, p + "layernorm_after")
    w, b = _linear(sd, p + "intermediate.dense")
    blk[f"{mlp}/Dense_0/kernel"], blk[f"{mlp}/Dense_0/bias"] = w.T, b
    w, b = _linear(sd, p + "output.dense")
    blk[f"{mlp}/Dense_1/kernel"], blk[f"{mlp}/Dense_1/bias"] = w.T, b
    blocks.append(blk)

  if flavour == "stacked":
    for k in blocks[0]:
      out[f"Transformer/encoderblock/{k}"] = np.stack([blk[k] for blk in blocks])
  else:
    for i, blk in enumerate(blocks):
      for k, v in blk.items():
        out[f"Transformer/encoderblock_{i}/{k}"] = v

  out["Transformer/encoder_norm/scale"], out["Transformer/encoder_norm/bias"] = _linear(
      sd, "layernorm")
  rng = np.random.default_rng(seed)
  out["pre_logits/kernel"], out["pre_logits/bias"] = _random_like_head(rng, d, d, cls.dtype)
  out["head/kernel"], out["head/bias"] = _random_like_head(rng, d, NUM_HEAD_CLASSES, cls.dtype)

  prefix = {"params": "params/", "params_img_posemb": "params/img/"}.get(flavour, "")
  return {prefix + k: np.ascontiguousarray(v) for k, v in out.items()}


def save_npz(path, flat: dict[str, np.ndarray]) -> None:
  """np.savez with the '/'-joined keys as array names (as the AugReg files are written)."""
  np.savez(path, **flat)


# ----------------------------------------------------------------------------------------------
# timm


def _timm_attn(sd: dict, p: str, q: str) -> dict[str, np.ndarray]:
  """timm `attn.qkv` (q, k, v stacked along the output axis) and `attn.proj` from HF block p."""
  ws, bs = zip(*(_linear(sd, p + f"attention.attention.{n}") for n in ("query", "key", "value")))
  w, b = _linear(sd, p + "attention.output.dense")
  return {f"{q}attn.qkv.weight": np.concatenate(ws, 0), f"{q}attn.qkv.bias": np.concatenate(bs, 0),
          f"{q}attn.proj.weight": w, f"{q}attn.proj.bias": b}


def _add_norm(out: dict, sd: dict, dst: str, src: str) -> None:
  out[dst + ".weight"], out[dst + ".bias"] = _linear(sd, src)


def _timm_head(out: dict, d: int, dtype, seed: int) -> None:
  k, b = _random_like_head(np.random.default_rng(seed), d, NUM_HEAD_CLASSES, dtype)
  out["head.weight"], out["head.bias"] = np.ascontiguousarray(k.T), b


def timm_from_hf_vit(sd: dict, *, head: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
  """A HF ViTModel state dict in timm's VisionTransformer layout.

  `cls_token` (1,1,D), `pos_embed` (1,1+N,D), `patch_embed.proj.{weight (D,3,p,p), bias}`,
  `blocks.{i}.{norm1, attn.qkv (3D,D), attn.proj, norm2, mlp.fc1, mlp.fc2}`, `norm`, and (head)
  a random `head.{weight (10,D), bias}`. Linear weights stay in torch (out, in) layout.
  """
  out: dict[str, np.ndarray] = {}
  out["cls_token"] = _get(sd, "embeddings.cls_token")
  out["pos_embed"] = _get(sd, "embeddings.position_embeddings")
  _add_norm(out, sd, "patch_embed.proj", "embeddings.patch_embeddings.projection")
  for i in range(_depth(sd)):
    p, q = f"encoder.layer.{i}.", f"blocks.{i}."
    _add_norm(out, sd, q + "norm1", p + "layernorm_before")
    out.update(_timm_attn(sd, p, q))
    _add_norm(out, sd, q + "norm2", p + "layernorm_after")
    _add_norm(out, sd, q + "mlp.fc1", p + "intermediate.dense")
    _add_norm(out, sd, q + "mlp.fc2", p + "output.dense")
  _add_norm(out, sd, "norm", "layernorm")
  if head:
    _timm_head(out, out["cls_token"].shape[-1], out["cls_token"].dtype, seed)
  return out


def _is_swiglu(sd: dict) -> bool:
  return "encoder.layer.0.mlp.weights_in.weight" in sd


def _dinov2_block(sd: dict, i: int, q: str, *, swiglu_names: tuple[str, str]) -> dict:
  """One DINOv2 block in the timm / facebookresearch naming (they differ only in SwiGLU names)."""
  p = f"encoder.layer.{i}."
  out: dict[str, np.ndarray] = {}
  _add_norm(out, sd, q + "norm1", p + "norm1")
  out.update(_timm_attn(sd, p, q))
  out[q + "ls1.gamma"] = _get(sd, p + "layer_scale1.lambda1")
  _add_norm(out, sd, q + "norm2", p + "norm2")
  if _is_swiglu(sd):
    # weights_in rows: [x1 (silu gate); x2]; out = weights_out(silu(x1) * x2), same packing.
    _add_norm(out, sd, q + swiglu_names[0], p + "mlp.weights_in")
    _add_norm(out, sd, q + swiglu_names[1], p + "mlp.weights_out")
  else:
    _add_norm(out, sd, q + "mlp.fc1", p + "mlp.fc1")
    _add_norm(out, sd, q + "mlp.fc2", p + "mlp.fc2")
  out[q + "ls2.gamma"] = _get(sd, p + "layer_scale2.lambda1")
  return out


def timm_from_hf_dinov2(sd: dict, *, head: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
  """A HF Dinov2Model / Dinov2WithRegistersModel state dict in timm's DINOv2 layout.

  As `timm_from_hf_vit` plus `blocks.{i}.ls{1,2}.gamma`; SwiGLU models keep the packed
  `mlp.fc1` (2*hidden, D) = [x1 (silu gate); x2] and `mlp.fc2` (D, hidden). Register models use
  timm's no_embed_class form: `reg_token` (1,R,D), `cls_token` = cls + pos[:, :1] (folded),
  `pos_embed` = pos[:, 1:] (1,N,D). Plain models keep `pos_embed` (1,1+N,D) and the raw cls.
  `mask_token` is dropped.
  """
  out: dict[str, np.ndarray] = {}
  cls = _get(sd, "embeddings.cls_token")
  pos = _get(sd, "embeddings.position_embeddings")
  if "embeddings.register_tokens" in sd:
    out["cls_token"] = cls + pos[:, :1]
    out["reg_token"] = _get(sd, "embeddings.register_tokens")
    out["pos_embed"] = np.ascontiguousarray(pos[:, 1:])
  else:
    out["cls_token"], out["pos_embed"] = cls, pos
  _add_norm(out, sd, "patch_embed.proj", "embeddings.patch_embeddings.projection")
  for i in range(_depth(sd)):
    out.update(_dinov2_block(sd, i, f"blocks.{i}.", swiglu_names=("mlp.fc1", "mlp.fc2")))
  _add_norm(out, sd, "norm", "layernorm")
  if head:
    _timm_head(out, cls.shape[-1], cls.dtype, seed)
  return out


# ----------------------------------------------------------------------------------------------
# DINOv2 original (facebookresearch) .pth


def dinov2_from_hf_dinov2(sd: dict, *, chunks: int = 0) -> dict[str, np.ndarray]:
  """A HF Dinov2Model / Dinov2WithRegistersModel state dict in the facebookresearch .pth layout.

  `cls_token` (1,1,D), `pos_embed` (1,1+N,D), `mask_token` (1,D), `register_tokens` (1,R,D)
  (register models), `patch_embed.proj.{weight,bias}`, `blocks.{i}.{norm1, attn.qkv (3D,D),
  attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}` (SwiGLU: `mlp.w12` (2*hidden, D),
  `mlp.w3` (D, hidden)), `norm`. With chunks > 0, blocks are split into `chunks` equal
  consecutive chunks named `blocks.{chunk}.{i}` with i the GLOBAL block index (`block_chunks`).
  """
  depth = _depth(sd)
  if chunks < 0 or (chunks and depth % chunks):
    raise ValueError(f"chunks={chunks} must be 0 or divide the depth {depth}")
  out: dict[str, np.ndarray] = {}
  out["cls_token"] = _get(sd, "embeddings.cls_token")
  out["pos_embed"] = _get(sd, "embeddings.position_embeddings")
  out["mask_token"] = _get(sd, "embeddings.mask_token")
  if "embeddings.register_tokens" in sd:
    out["register_tokens"] = _get(sd, "embeddings.register_tokens")
  _add_norm(out, sd, "patch_embed.proj", "embeddings.patch_embeddings.projection")
  per_chunk = depth // chunks if chunks else depth
  for i in range(depth):
    q = f"blocks.{i // per_chunk}.{i}." if chunks else f"blocks.{i}."
    out.update(_dinov2_block(sd, i, q, swiglu_names=("mlp.w12", "mlp.w3")))
  _add_norm(out, sd, "norm", "layernorm")
  return out


# ----------------------------------------------------------------------------------------------
# DINOv3 original (facebookresearch/dinov3) .pth


def dinov3_from_hf_dinov3(sd: dict, *, num_heads: int, rope_base: float = 100.0,
                          k_bias_noise: float = 0.0, local_cls_norm: bool = False,
                          seed: int = 0) -> dict[str, np.ndarray]:
  """A HF DINOv3ViTModel state dict (as save_pretrained writes it: `layer.{i}`) in the
  facebookresearch/dinov3 layout of models/vision_transformer.py + layers/.

  `cls_token` (1,1,D), `storage_tokens` (1,R,D), `mask_token` (1,D) (not (1,1,D) as in HF),
  `patch_embed.proj.{weight,bias}`, `rope_embed.periods` (hd/4,) = base ** (2 j / (hd / 2))
  (`RopePositionEmbedding._init_weights`), `blocks.{i}.{norm1, attn.qkv.weight (3D,D),
  attn.qkv.bias (3D,), attn.qkv.bias_mask (3D,) = [1]*D + [0]*D + [1]*D (`LinearKMaskedBias`,
  init_weights_vit), attn.proj, ls1.gamma, norm2, mlp.fc1 / fc2 (GELU) or mlp.w1 / w2 / w3
  (SwiGLUFFN: w3(silu(w1 x) * w2 x)), ls2.gamma}`, `norm`. HF has no key bias: the k third of
  the packed bias is random noise of scale `k_bias_noise` (the mask must remove it);
  `local_cls_norm` adds the random training-only norm of the 7B checkpoint.
  """
  rng = np.random.default_rng(seed)
  idx = {int(m.group(1)) for k in sd if (m := re.match(r"layer\.(\d+)\.", k))}
  if not idx or idx != set(range(len(idx))):
    raise KeyError(f"no contiguous layer.{{i}} keys in {sorted(sd)[:6]} (a DINOv3ViTModel file)")
  out: dict[str, np.ndarray] = {}
  out["cls_token"] = _get(sd, "embeddings.cls_token")
  d = out["cls_token"].shape[-1]
  out["storage_tokens"] = _get(sd, "embeddings.register_tokens")
  out["mask_token"] = _get(sd, "embeddings.mask_token").reshape(1, d)
  _add_norm(out, sd, "patch_embed.proj", "embeddings.patch_embeddings")
  hd = d // num_heads
  out["rope_embed.periods"] = (rope_base ** (2 * np.arange(hd // 4) / (hd // 2))).astype(
      np.float32)
  for i in sorted(idx):
    p, q = f"layer.{i}.", f"blocks.{i}."
    _add_norm(out, sd, q + "norm1", p + "norm1")
    a = p + "attention."
    out[q + "attn.qkv.weight"] = np.concatenate(
        [_get(sd, a + f"{n}_proj.weight") for n in "qkv"], 0)
    if a + "q_proj.bias" in sd:  # (the 7B model has no qkv bias)
      k_bias = (k_bias_noise * rng.standard_normal(d)).astype(np.float32)
      out[q + "attn.qkv.bias"] = np.concatenate(
          [_get(sd, a + "q_proj.bias"), k_bias, _get(sd, a + "v_proj.bias")])
      out[q + "attn.qkv.bias_mask"] = np.concatenate(
          [np.ones(d), np.zeros(d), np.ones(d)]).astype(np.float32)
    _add_norm(out, sd, q + "attn.proj", a + "o_proj")
    out[q + "ls1.gamma"] = _get(sd, p + "layer_scale1.lambda1")
    _add_norm(out, sd, q + "norm2", p + "norm2")
    if p + "mlp.gate_proj.weight" in sd:
      for ours, theirs in (("w1", "gate_proj"), ("w2", "up_proj"), ("w3", "down_proj")):
        _add_norm(out, sd, q + "mlp." + ours, p + "mlp." + theirs)
    else:
      _add_norm(out, sd, q + "mlp.fc1", p + "mlp.up_proj")
      _add_norm(out, sd, q + "mlp.fc2", p + "mlp.down_proj")
    out[q + "ls2.gamma"] = _get(sd, p + "layer_scale2.lambda1")
  _add_norm(out, sd, "norm", "norm")
  if local_cls_norm:
    out["local_cls_norm.weight"] = rng.standard_normal(d).astype(np.float32)
    out["local_cls_norm.bias"] = rng.standard_normal(d).astype(np.float32)
  return out


# ----------------------------------------------------------------------------------------------
# Saving


def _to_torch(sd: dict) -> dict:
  import torch

  return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}


def save_torch(path, sd: dict[str, np.ndarray], wrap: str | None = None) -> None:
  """torch.save of the arrays as tensors, optionally wrapped as {wrap: state_dict}."""
  import torch

  tensors = _to_torch(sd)
  torch.save({wrap: tensors} if wrap else tensors, path)


def save_safetensors(path, sd: dict[str, np.ndarray]) -> None:
  """A .safetensors file (metadata format=pt, as timm / HF write them)."""
  from safetensors.numpy import save_file

  save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(path),
            metadata={"format": "pt"})


class CheckpointMeta:
  """A stand-in for the library objects (mmcv Config, ...) some released pickles carry."""

  def __init__(self, **fields):
    self.fields = dict(fields)

  def __eq__(self, other):
    return isinstance(other, CheckpointMeta) and self.fields == other.fields


def save_pickle_with_object(path, sd: dict[str, np.ndarray], wrap: str | None = "state_dict",
                            **meta) -> None:
  """torch.save of {wrap: tensors, "meta": CheckpointMeta(**meta)} (wrap=None: the tensors and
  "meta" side by side at the top level). `torch.load(weights_only=True)` refuses the file
  (pickle.UnpicklingError); `weights_only=False` loads it while this module is importable."""
  import torch

  tensors = _to_torch(sd)
  obj = dict(tensors) if wrap is None else {wrap: tensors}
  obj["meta"] = CheckpointMeta(**(meta or {"config": "segvit", "mmcv_version": "1.4.0"}))
  torch.save(obj, path)


# ----------------------------------------------------------------------------------------------
# SegFormer: the NVlabs release (mmseg 0.x) from transformers' saved layout


def _segformer_official_key(key: str) -> str | None:
  """One transformers SegformerForSemanticSegmentation key -> the release's (None: the key and
  value projections, packed apart). Stages are 0-based there, 1-based in the release."""
  up = lambda m: str(int(m.group(1)) + 1)  # noqa: E731
  enc = "segformer.encoder."
  if key.startswith(enc):
    k = key[len(enc):]
    if re.match(r"block\.\d+\.\d+\.attention\.self\.(key|value)\.", k):
      return None
    k = re.sub(r"^patch_embeddings\.(\d+)\.", lambda m: f"patch_embed{up(m)}.", k)
    k = re.sub(r"^layer_norm\.(\d+)\.", lambda m: f"norm{up(m)}.", k)
    k = re.sub(r"^block\.(\d+)\.", lambda m: f"block{up(m)}.", k)
    for old, new in ((".layer_norm.", ".norm."), ("layer_norm_1.", "norm1."),
                     ("layer_norm_2.", "norm2."), ("attention.self.query.", "attn.q."),
                     ("attention.self.sr.", "attn.sr."), ("attention.self.norm.", "attn.norm."),
                     ("attention.output.dense.", "attn.proj."), ("mlp.dense1.", "mlp.fc1."),
                     ("mlp.dense2.", "mlp.fc2.")):
      k = k.replace(old, new)
    return "backbone." + k
  k = key.removeprefix("decode_head.")
  k = re.sub(r"^linear_c\.(\d+)\.", lambda m: f"linear_c{up(m)}.", k)
  k = re.sub(r"^linear_fuse\.", "linear_fuse.conv.", k)
  k = re.sub(r"^batch_norm\.", "linear_fuse.bn.", k)
  k = re.sub(r"^classifier\.", "linear_pred.", k)
  return "decode_head." + k


def segformer_official_state_dict(sd: dict, *, encoder_only: bool = False,
                                  seed: int = 0) -> dict[str, np.ndarray]:
  """transformers' saved SegformerForSemanticSegmentation state dict -> the release's
  (NVlabs/SegFormer's `mix_transformer.py` / `segformer_head.py`): `backbone.*` (key and value
  packed in `attn.kv`, key rows first) + `decode_head.*` with mmseg's unused `conv_seg`
  (random). With `encoder_only`: an ImageNet `mit_bX.pth`, the backbone keys without
  `backbone.` plus a random 1000-class `head.*`."""
  rng = np.random.default_rng(seed)
  out = {}
  for key, value in sd.items():
    name = _segformer_official_key(key)
    if name is not None:
      out[name] = np.array(value)  # copies; keeps 0-d arrays (num_batches_tracked) 0-d
  for key in sd:
    m = re.fullmatch(r"segformer\.encoder\.block\.(\d+)\.(\d+)\.attention\.self\.key\.(\w+)", key)
    if m:
      value = _get(sd, key.replace(".key.", ".value."))
      kv = f"backbone.block{int(m.group(1)) + 1}.{m.group(2)}.attn.kv.{m.group(3)}"
      out[kv] = np.concatenate([_get(sd, key), value], axis=0)
  cls = out["decode_head.linear_pred.weight"]
  out["decode_head.conv_seg.weight"] = rng.standard_normal(cls.shape).astype(cls.dtype)
  out["decode_head.conv_seg.bias"] = rng.standard_normal(cls.shape[:1]).astype(cls.dtype)
  if encoder_only:
    out = {k[len("backbone."):]: v for k, v in out.items() if k.startswith("backbone.")}
    last = max(int(m.group(1)) for k in out if (m := re.match(r"norm(\d+)\.weight", k)))
    d = out[f"norm{last}.weight"].shape[0]
    out["head.weight"] = (rng.standard_normal((1000, d)) / np.sqrt(d)).astype(np.float32)
    out["head.bias"] = np.zeros(1000, np.float32)
  return out


# ----------------------------------------------------------------------------------------------
# EoMT: the authors' release (Lightning) from transformers' saved layout


IMAGENET_MEAN_01 = (0.485, 0.456, 0.406)
IMAGENET_STD_01 = (0.229, 0.224, 0.225)


def _eomt_official_key(key: str) -> str | None:
  """One transformers EomtForUniversalSegmentation key (as saved) -> the release's, None for
  the tensors packed or rebuilt apart (q / k / v, SwiGLU, the position table)."""
  if re.fullmatch(r"layers\.\d+\.(attention\.[qkv]_proj|mlp\.(gate_proj|up_proj|weights_in))"
                  r"\.\w+", key) or key == "embeddings.position_embeddings.weight":
    return None
  m = re.fullmatch(r"layers\.(\d+)\.(.*)", key)
  if m:
    rest = m.group(2)
    for old, new in (("attention.out_proj.", "attn.proj."), ("layer_scale1.lambda1", "ls1.gamma"),
                     ("layer_scale2.lambda1", "ls2.gamma"), ("mlp.down_proj.", "mlp.fc2."),
                     ("mlp.weights_out.", "mlp.fc2.")):
      rest = rest.replace(old, new)
    return f"network.encoder.backbone.blocks.{m.group(1)}.{rest}"
  m = re.fullmatch(r"upscale_block\.block\.(\d+)\.(conv1|conv2|layernorm2d)\.(\w+)", key)
  if m:
    part = "norm" if m.group(2) == "layernorm2d" else m.group(2)
    return f"network.upscale.{m.group(1)}.{part}.{m.group(3)}"
  m = re.fullmatch(r"mask_head\.fc([123])\.(\w+)", key)
  if m:
    return f"network.mask_head.{2 * (int(m.group(1)) - 1)}.{m.group(2)}"
  fixed = {"embeddings.cls_token": "network.encoder.backbone.cls_token",
           "embeddings.register_tokens": "network.encoder.backbone.reg_token",
           "query.weight": "network.q.weight", "attn_mask_probs": "network.attn_mask_probs",
           "criterion.empty_weight": "criterion.empty_weight"}
  if key in fixed:
    return fixed[key]
  for old, new in (("embeddings.patch_embeddings.projection.",
                    "network.encoder.backbone.patch_embed.proj."),
                   ("layernorm.", "network.encoder.backbone.norm."),
                   ("class_predictor.", "network.class_head.")):
    if key.startswith(old):
      return new + key[len(old):]
  raise KeyError(f"unmapped transformers EoMT key {key!r}")


def eomt_official_state_dict(sd: dict, *, pixel_mean=IMAGENET_MEAN_01,
                             pixel_std=IMAGENET_STD_01) -> dict[str, np.ndarray]:
  """transformers' saved EomtForUniversalSegmentation state dict -> the release's
  LightningModule state dict (tue-mps/eomt's `training/lightning_module.py`):
  `network.encoder.backbone.*` in timm's DINOv2 names (`attn.qkv` (3D, D) = q, k, v stacked;
  `pos_embed` (1, N, D) without a cls slot, timm's no_embed_class; `reg_token`; SwiGLU packed as
  `mlp.fc1` (2h, D) = [gate; value], `mlp.fc2` = the down projection), `network.q.weight`,
  `network.class_head`, `network.mask_head.{0,2,4}`, `network.upscale.{i}.{conv1, conv2, norm}`,
  the buffers `network.attn_mask_probs`, `network.encoder.pixel_mean/std` (1, 3, 1, 1) on the
  0-1 scale, and `criterion.empty_weight`."""
  out = {}
  for key, value in sd.items():
    name = _eomt_official_key(key)
    if name is not None:
      out[name] = np.array(value)
  layers = sorted({int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))})
  for i in layers:
    p, q = f"layers.{i}.", f"network.encoder.backbone.blocks.{i}."
    for part in ("weight", "bias"):
      out[f"{q}attn.qkv.{part}"] = np.concatenate(
          [_get(sd, f"{p}attention.{x}_proj.{part}") for x in "qkv"], 0)
      if f"{p}mlp.gate_proj.{part}" in sd:  # transformers 5.x names
        out[f"{q}mlp.fc1.{part}"] = np.concatenate(
            [_get(sd, f"{p}mlp.gate_proj.{part}"), _get(sd, f"{p}mlp.up_proj.{part}")], 0)
      elif f"{p}mlp.weights_in.{part}" in sd:  # 4.x: already packed [gate; value]
        out[f"{q}mlp.fc1.{part}"] = _get(sd, f"{p}mlp.weights_in.{part}")
  out["network.encoder.backbone.pos_embed"] = _get(sd, "embeddings.position_embeddings.weight")[
      None]
  out["network.encoder.pixel_mean"] = np.asarray(pixel_mean, np.float32).reshape(1, 3, 1, 1)
  out["network.encoder.pixel_std"] = np.asarray(pixel_std, np.float32).reshape(1, 3, 1, 1)
  return out


def hf_eomt_packed_swiglu(sd: dict) -> dict[str, np.ndarray]:
  """A transformers 5.x EoMT state dict with SwiGLU (`mlp.gate_proj/up_proj/down_proj`) in the
  names transformers 4.x saved (the hub's files): `mlp.weights_in` (2h, D) = [gate; value] and
  `mlp.weights_out`."""
  out = {}
  for key, value in sd.items():
    m = re.fullmatch(r"(layers\.\d+\.mlp\.)(gate_proj|up_proj|down_proj)\.(\w+)", key)
    if not m:
      out[key] = np.array(value)
    elif m.group(2) == "down_proj":
      out[f"{m.group(1)}weights_out.{m.group(3)}"] = np.array(value)
    elif m.group(2) == "gate_proj":
      out[f"{m.group(1)}weights_in.{m.group(3)}"] = np.concatenate(
          [_get(sd, key), _get(sd, key.replace("gate_proj", "up_proj"))], 0)
  return out


def eomt_dinov3_official_key(key: str) -> str:
  """One transformers EomtDinov3ForUniversalSegmentation key (as saved) -> the release's: its
  encoder is transformers' DINOv3ViTModel (4.56) under `network.encoder.backbone.` with the
  names its models/vit.py `transformers_to_timm` gives: `embeddings` -> `patch_embed`, `layer`
  -> `blocks` (the block's own names kept), the final `norm`; the rest as the DINOv2 release."""
  m = re.fullmatch(r"layers\.(\d+)\.(.*)", key)
  if m:
    return f"network.encoder.backbone.blocks.{m.group(1)}.{m.group(2)}"
  if key.startswith("embeddings."):
    return "network.encoder.backbone.patch_embed." + key[len("embeddings."):]
  if key.startswith("layernorm."):
    return "network.encoder.backbone.norm." + key[len("layernorm."):]
  name = _eomt_official_key(key)  # queries, heads, up-scaler, buffers
  if name is None:
    raise KeyError(f"unmapped transformers EoMT-DINOv3 key {key!r}")
  return name


def eomt_dinov3_official_state_dict(sd: dict, *, pixel_mean=IMAGENET_MEAN_01,
                                    pixel_std=IMAGENET_STD_01) -> dict[str, np.ndarray]:
  """transformers' saved EomtDinov3ForUniversalSegmentation state dict -> the release's
  LightningModule state dict on DINOv3 (full weights), pixel buffers (1, 3, 1, 1) included."""
  out = {eomt_dinov3_official_key(k): np.array(v) for k, v in sd.items()}
  out["network.encoder.pixel_mean"] = np.asarray(pixel_mean, np.float32).reshape(1, 3, 1, 1)
  out["network.encoder.pixel_std"] = np.asarray(pixel_std, np.float32).reshape(1, 3, 1, 1)
  return out


def _release_fresh(key: str, value: np.ndarray, base: dict) -> np.ndarray:
  """What the release's LightningModule holds for `key` before it adds a delta-weight file
  (training/lightning_module.py, `delta_weights: True`: `_zero_init_outside_encoder`, then
  `_add_state_dicts`): the DINOv3ViTModel weights `base` (save_pretrained names: `embeddings.*`,
  `layer.{i}.*`, `norm.*`) for `network.encoder.backbone.*`, the fixed ImageNet pixel buffers of
  models/vit.py, the fresh `attn_mask_probs` (ones), zeros for every other parameter; the
  loss's `criterion.*` is not loaded (zeros: stored as it is)."""
  p = "network.encoder.backbone."
  if key.startswith(p):
    rest = key[len(p):]
    rest = re.sub(r"^blocks\.", "layer.", re.sub(r"^patch_embed\.", "embeddings.", rest))
    return _get(base, rest)
  if key in ("network.encoder.pixel_mean", "network.encoder.pixel_std"):
    fresh = IMAGENET_MEAN_01 if key.endswith("mean") else IMAGENET_STD_01
    return np.asarray(fresh, np.float32).reshape(1, 3, 1, 1)
  if key == "network.attn_mask_probs":
    return np.ones_like(value)
  return np.zeros_like(value)


def eomt_release_delta(full: dict, base: dict) -> dict[str, np.ndarray]:
  """A full release state dict on DINOv3 -> its delta form: each tensor minus what the
  release's model holds before loading (`_release_fresh`), in float32."""
  return {k: np.float32(v) - _release_fresh(k, v, base) for k, v in full.items()}


def eomt_release_add(delta: dict, base: dict) -> dict[str, np.ndarray]:
  """The release's loading of a delta-weight state dict: each tensor plus what its model holds
  before loading (`_release_fresh`), in float32: the full weights it runs."""
  return {k: _release_fresh(k, v, base) + np.float32(v) for k, v in delta.items()}
