"""Whole EoMT models (`models.eomt.EoMT`) in the layouts of the authors' release and of
HuggingFace transformers, both ways (the release's `models/eomt.py`, `models/vit.py`,
`models/scale_block.py` (tue-mps/eomt); transformers' `modeling_eomt.py` and
`modeling_eomt_dinov3.py`):

  python -m segvit_jax.convert SRC OUT --from eomt-official|hf-eomt|hf-eomt-dinov3 \
      [--config X.py[:ARG]] [--backbone DINOV3 (eomt-official delta weights)]
  python -m segvit_jax.convert BUNDLE OUT --to eomt-official|hf-eomt|hf-eomt-dinov3 \
      [--delta_from DINOV3 (eomt-official)]

Formats (one `KeyRule` table each, shared by import and export, as `segformer.py`):
  eomt-official  a checkpoint of the release (tue-mps/eomt, Lightning): the LightningModule's
      state dict, bare or wrapped in `state_dict` beside `epoch`, `optimizer_states`, ...
      (skipped). The network is under `network.`: timm's DINOv2 under
      `network.encoder.backbone.` (q / k / v packed in `attn.qkv`; giant's SwiGLU packed as
      `mlp.fc1` (2h, D) = [gate; value] and `mlp.fc2`; registers `reg_token`; timm's
      `no_embed_class` position table `pos_embed` (1, N, D): the cls token has no position, our
      cls slot is zero), `network.q.weight` (K, D), `network.class_head`,
      `network.mask_head.{0,2,4}` (an nn.Sequential with GELUs between),
      `network.upscale.{i}.{conv1, conv2, norm}`. Buffers, read apart: `network.attn_mask_probs`
      (L2,) and `network.encoder.pixel_mean` / `pixel_std` (1, 3, 1, 1) on the 0-1 scale (the
      release divides images by 255 first; the bundle's mean / std are 255 times them). The
      loss's class weights `criterion.empty_weight` are dropped. A file holding the network's
      own state dict (no `network.` prefix) is read too. On DINOv3 (its second model zoo) the
      encoder is transformers' DINOv3ViTModel (4.56) as the release's `models/vit.py` renames
      it: `network.encoder.backbone.patch_embed.{cls_token, register_tokens,
      patch_embeddings}` (`embeddings`, its `mask_token` deleted),
      `network.encoder.backbone.blocks.{i}.*` (`layer`, DINOv3ViTLayer's names) and
      `network.encoder.backbone.norm`; the RoPE fields, which the file does not record, are
      the DINOv3 release's (`convert/dinov3.py`) or those of the `--backbone`.
  Delta weights (the release's DINOv3 model zoo, `delta_weights: True` in its configs): the
      file holds what its LightningModule adds to the model it builds with the DINOv3 weights
      loaded into the encoder and every other parameter zeroed (`_zero_init_outside_encoder`,
      `_add_state_dicts`): the encoder minus those weights, the pixel buffers minus the fixed
      ImageNet ones, `attn_mask_probs` minus ones, the rest as it is. Such a file is told by
      its zero `pixel_std` (`is_delta`); `--backbone` (a facebookresearch/dinov3 .pth, a
      DINOv3ViTModel directory or a backbone bundle: `dinov3.read_backbone`) adds the weights
      back in float32, as the release, and `--to eomt-official --delta_from` writes the form.
  hf-eomt  a `save_pretrained` directory of transformers' EomtForUniversalSegmentation
      (config.json + model.safetensors, sharded, or pytorch_model.bin): `embeddings.*`,
      `layers.{i}.*`, `layernorm`, `query`, `class_predictor`, `mask_head.fc{1,2,3}`,
      `upscale_block.block.{i}.*`, buffers `attn_mask_probs` and `criterion.empty_weight`
      (dropped). SwiGLU (giant): transformers 5 saves `mlp.gate_proj / up_proj / down_proj`;
      files of transformers 4.x have `mlp.weights_in` (packed [gate; value]) and
      `mlp.weights_out` (the names of transformers 4.x): both are read; export writes
      transformers 5's.
  hf-eomt-dinov3  a `save_pretrained` directory of transformers'
      EomtDinov3ForUniversalSegmentation (EoMT on DINOv3): the names of hf-eomt for the
      queries and the head; the ViT's as DINOv3ViTModel's (`convert/dinov3.py`): no position
      table (RoPE: `rope_parameters.rope_theta` and `pos_embed_*` in config.json),
      `embeddings.patch_embeddings`, `attention.{q,k,v,o}_proj` without a key bias,
      `mlp.{up,down}_proj` (GELU). The gated MLP is refused: transformers runs the head with
      the backbone's `hidden_act` (SiLU with the gated MLP), the release's head is GELU.
      transformers runs it on square inputs of its `image_size` only; the bundle any size.

What the files do not record. The release's files record neither the attention heads (from
the width, `backbone.HEADS_BY_WIDTH`) nor, except through the length of its `attn_mask_probs`
buffer, L2 (`num_blocks`, the blocks that see the queries). `--config configs/X.py[:ARG]`
(optional for both layouts) gives them, with class names, pixel statistics and the test
protocol the bundle records (its `eval` section; without --config none); its model must
agree with the file (every field the file records, shapes strictly). Files this module wrote
carry our model config in `meta.segvit_jax`, read (and checked) as a `--config` would be, so
their re-import needs none. Classes: `--config`'s, HF's id2label, the export's meta, else
class_0, class_1, ... Pixel statistics: the release's buffers, HF's preprocessor_config.json,
else `--config`'s, else ImageNet's (a `--config` that disagrees with the file is warned about;
the file wins). A file saved before masked attention was annealed away (a probability > 0 in
`attn_mask_probs`) is warned about: the bundle runs unmasked, as EoMT's inference.

Position embeddings. Both layouts store the position table of the training crop (timm resizes
DINOv2's 37x37 table once, when the release loads the pretrained weights); the bundle keeps that
grid (`posemb_grid`) and resizes at run time for other input sizes with the method of the
source: timm's `resample_abs_pos_embed`, bicubic with antialias (`bicubic_antialias`), for the
release; transformers' EoMT has a fixed grid and never resizes (its inputs must be the
configured size), so an HF import records plain `bicubic`. Nothing is resampled on
conversion: bundle -> export -> import is bitwise exact.

Export. Both layouts give the cls token no position: a non-zero cls slot of our table (a model
trained here) is folded into the cls token (the same function; zero slots stay bitwise). The
buffers are written so the files load as they are: `attn_mask_probs` as zeros, the value of a
fully annealed model (transformers masks attention in eval whenever a probability is > 0),
`criterion.empty_weight` as ones with the no-object weight last (the bundle's
`loss.no_object_weight` where its config.json records one, else 0.1), and
(release) the pixel buffers from the bundle's mean / std. The release's timm blocks use
LayerNorm eps 1e-6 (warned about when the bundle's differs); transformers reads the eps from
config.json. hf-eomt also writes preprocessor_config.json (the bundle's mean / std, EoMT's
semantic inference: shorter side to the crop size, square windows).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping

import ml_collections
import numpy as np
from absl import logging

from segvit_jax import bundle as bundle_lib
from segvit_jax.convert import dinov3, timm
from segvit_jax.convert.backbone import HEADS_BY_WIDTH, IMAGENET_MEAN_STD, Converted, \
    infer_backbone, is_square
from segvit_jax.convert.rules import Flat, KeyRule, attention, conv, conv_transpose, flatten, \
    hf_class_names, hf_mean_std, hf_unsupported, key_list, linear, mlp, natural_key, norm, \
    read_hf_model_dir, read_torch_checkpoint, swiglu, to_ours, to_theirs, unflatten, \
    write_hf_dir, write_torch_checkpoint
from segvit_jax.convert.whole_model import abstract_variables, class_names, class_weights, \
    labels, load_config, no_object_weight, with_recorded
from segvit_jax.models import vit
from segvit_jax.models import eomt as eomt_model

OFFICIAL = "eomt-official"
HF = "hf-eomt"
HF_DINOV3 = "hf-eomt-dinov3"
FORMATS = (OFFICIAL, HF, HF_DINOV3)
HF_FORMATS = (HF, HF_DINOV3)
# Run-time position-embedding resize of each layout's implementation (module docstring; DINOv3
# has no position table).
POSEMB_RESIZE = {OFFICIAL: "bicubic_antialias", HF: "bicubic", HF_DINOV3: "bicubic"}
# The release's timm DINOv2 (LayerNorm eps, LayerScale init); transformers reads config.json.
RELEASE_NORM_EPS, RELEASE_LAYERSCALE = 1e-6, 1e-5
# The no-object class weight of the loss buffer written on export when the bundle records none
# (the release's and transformers' default; Mask2Former Sec. 4.1, "Loss weights.").
NO_OBJECT_WEIGHT = 0.1
P = "params/"  # our side of the tables: flat variable paths, collection first


# ----------------------------------------------------------------------------------------------
# Transforms

def _posemb_in(pos):
  """The release's pos_embed (1, N, D) (timm `no_embed_class`) -> ours with a zero cls slot;
  a table that already has a cls slot (1, 1 + g*g, D) stays."""
  return np.concatenate([np.zeros_like(pos[:, :1]), pos], 1) if is_square(pos.shape[1]) else pos


def _posemb_out(pos):
  """Ours (1, 1 + N, D) -> (1, N, D); the cls slot is zero (`_fold_cls_slot`)."""
  return pos[:, 1:]


def _hf_posemb_in(pos):
  """transformers' position_embeddings.weight (N, D) -> ours (1, 1 + N, D), zero cls slot."""
  return np.concatenate([np.zeros_like(pos[:1]), pos])[None]


def _hf_posemb_out(pos):
  return pos[0, 1:]


# ----------------------------------------------------------------------------------------------
# The tables

def _ffn(key: str, ours: str, kind: str) -> tuple[KeyRule, ...]:
  """The FFN of one transformers block: "mlp" (fc1, fc2), "hf_swiglu" (gate_proj, up_proj,
  down_proj), "hf_swiglu_packed" (weights_in = [gate; value], weights_out)."""
  if kind == "mlp":
    return mlp(key, ours)
  names = {"hf_swiglu": ("gate_proj", "up_proj", "down_proj"),
           "hf_swiglu_packed": ("weights_in", "weights_out")}[kind]
  return swiglu(key, ours, names)


def _scale_block(key: str, ours: str, norm_name: str) -> tuple[KeyRule, ...]:
  """ScaleBlock: ConvTranspose 2x2 stride 2, depthwise 3x3 conv without bias, LayerNorm2d."""
  return (*conv_transpose(key + "conv1", ours + "conv1"),
          *conv(key + "conv2", ours + "conv2", bias=False),  # (D, 1, 3, 3) <-> (3, 3, 1, D)
          *norm(key + norm_name, ours + "norm"))


def official_rules(ffn: str) -> tuple[KeyRule, ...]:
  """The release's network on DINOv2 (`ffn`: "mlp" or "swiglu") <-> our EoMT: its encoder is
  timm's ViT (`timm.py`), with timm's `no_embed_class` position table."""
  bb, o = "network.encoder.backbone.", P + "backbone/"
  return (
      *timm.embed_rules(bb, o, posemb_in=_posemb_in, posemb_out=_posemb_out),
      KeyRule(bb + "reg_token", o + "registers"),
      *timm.block_rules(bb + "blocks.{i}.", o + "encoderblock_{i}/", ffn),
      *_official_head_rules(),
  )


def official_dinov3_rules(ffn: str) -> tuple[KeyRule, ...]:
  """The release's network on DINOv3 <-> our EoMT: its encoder is transformers'
  DINOv3ViTModel (`dinov3.hf_rules`) with the module names the release's `models/vit.py`
  (`transformers_to_timm`) gives it: `embeddings` -> `patch_embed` (its `mask_token` deleted),
  `layer` -> `blocks`."""
  bb = "network.encoder.backbone."
  return (*dinov3.hf_rules(ffn, embeddings=bb + "patch_embed.", layer=bb + "blocks.{i}.",
                           final_norm=bb + "norm", ours=P + "backbone/"),
          *_official_head_rules())


def _official_head_rules() -> tuple[KeyRule, ...]:
  """The release's queries, class head, mask MLP and up-scaler (either encoder)."""
  return (
      KeyRule("network.q.weight", P + "queries"),
      *linear("network.class_head", P + "head/class_head"),
      *(r for j, k in enumerate((0, 2, 4))  # Linear, GELU, Linear, GELU, Linear
        for r in linear(f"network.mask_head.{k}", f"{P}head/mask_head/fc{j + 1}")),
      *_scale_block("network.upscale.{i}.", P + "head/upscale_{i}/", "norm"),
  )


def hf_rules(ffn: str, *, packed_swiglu: bool = False) -> tuple[KeyRule, ...]:
  """transformers' EomtForUniversalSegmentation as saved <-> our EoMT; `packed_swiglu`: the
  4.x names (import only: export writes one layout)."""
  e, o = "embeddings.", P + "backbone/"
  b, ob = "layers.{i}.", o + "encoderblock_{i}/"
  if ffn == "swiglu":
    kind = "hf_swiglu_packed" if packed_swiglu else "hf_swiglu"
  else:
    kind = "mlp"
  return (
      KeyRule(e + "position_embeddings.weight", o + "pos_embedding", _hf_posemb_in,
              _hf_posemb_out),
      *conv(e + "patch_embeddings.projection", o + "embedding"),
      *attention(b + "attention.", ob + "attn", ("q_proj", "k_proj", "v_proj", "out_proj")),
      *_ffn(b + "mlp.", ob + "mlp", kind),
      *_hf_shared_rules(),
  )


def hf_dinov3_rules(ffn: str) -> tuple[KeyRule, ...]:
  """transformers' EomtDinov3ForUniversalSegmentation as saved <-> our EoMT on DINOv3: the ViT
  in DINOv3ViTModel's names (`dinov3.hf_rules`) under `layers.{i}` and `layernorm` (no position
  table, no key bias: its rule never matches), the head as EoMT's."""
  return (*dinov3.hf_rules(ffn, layer="layers.{i}.", final_norm="layernorm",
                           ours=P + "backbone/"),  # (the gated MLP is refused: `_read_hf`)
          *_hf_head_rules())


def _hf_shared_rules() -> tuple[KeyRule, ...]:
  """transformers' EoMT on DINOv2: its tokens, norms and LayerScale; and the head."""
  e, o = "embeddings.", P + "backbone/"
  b, ob = "layers.{i}.", o + "encoderblock_{i}/"
  return (
      KeyRule(e + "cls_token", o + "cls"),
      KeyRule(e + "register_tokens", o + "registers"),
      *norm(b + "norm1", ob + "norm1"),
      KeyRule(b + "layer_scale1.lambda1", ob + "ls1"),
      *norm(b + "norm2", ob + "norm2"),
      KeyRule(b + "layer_scale2.lambda1", ob + "ls2"),
      *norm("layernorm", o + "encoder_norm"),
      *_hf_head_rules(),
  )


def _hf_head_rules() -> tuple[KeyRule, ...]:
  """transformers' EoMT and EoMT-DINOv3 queries and head."""
  return (
      KeyRule("query.weight", P + "queries"),
      *linear("class_predictor", P + "head/class_head"),
      *(r for j in (1, 2, 3) for r in linear(f"mask_head.fc{j}", f"{P}head/mask_head/fc{j}")),
      *_scale_block("upscale_block.block.{i}.", P + "head/upscale_{i}/", "layernorm2d"),
  )


# Buffers read apart (`_buffers`) or dropped (regexes, full match).
MASK_PROBS = {OFFICIAL: "network.attn_mask_probs", HF: "attn_mask_probs",
              HF_DINOV3: "attn_mask_probs"}
PIXEL_MEAN, PIXEL_STD = "network.encoder.pixel_mean", "network.encoder.pixel_std"
EMPTY_WEIGHT = "criterion.empty_weight"
DROPPED = {
    OFFICIAL: (re.escape(MASK_PROBS[OFFICIAL]), r"network\.encoder\.pixel_(?:mean|std)",
               r"criterion\..*"),
    HF: (re.escape(MASK_PROBS[HF]), r"criterion\..*"),
    HF_DINOV3: (re.escape(MASK_PROBS[HF]), r"criterion\..*"),
}
# The patch embedding of the release's encoder on DINOv2 (timm) and on DINOv3 (transformers).
_OFFICIAL_MARKER = "network.encoder.backbone.patch_embed.proj.weight"
_OFFICIAL_DINOV3_MARKER = "network.encoder.backbone.patch_embed.patch_embeddings.weight"
_OFFICIAL_MARKERS = (_OFFICIAL_MARKER, _OFFICIAL_DINOV3_MARKER)
_OFFICIAL_DINOV3_SWIGLU = "network.encoder.backbone.blocks.0.mlp.gate_proj.weight"
# The values the release's LightningModule holds before it adds a delta-weight file
# (`delta_weights: True`): the encoder's DINOv3 weights, its fixed pixel buffers (models/vit.py,
# ImageNet on the 0-1 scale), the fresh `attn_mask_probs` (ones); every other parameter zero.
RELEASE_PIXEL_MEAN_01, RELEASE_PIXEL_STD_01 = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RELEASE_MASK_PROBS = 1.0


# ----------------------------------------------------------------------------------------------
# Reading files

def _official_tensors(tensors: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
  """The release's tensors with the `network.` prefix (added to a bare network state dict);
  a checkpoint of another model fails naming some of its keys."""
  if not any(m in tensors for m in _OFFICIAL_MARKERS) and any(
      m[len("network."):] in tensors for m in _OFFICIAL_MARKERS):
    tensors = {"network." + k: v for k, v in tensors.items()}
  if any(m in tensors for m in _OFFICIAL_MARKERS):
    return tensors
  keys = list(tensors)
  hints = [("backbone.layers.", "a SegViT checkpoint (--from segvit-official)"),
           ("backbone.patch_embed1.", "a SegFormer checkpoint (--from segformer-official)"),
           ("embeddings.patch_embeddings.", "a transformers directory's weights (--from hf-eomt "
                                            "reads the directory)"),
           ("blocks.0.", "a ViT backbone (timm / DINOv2: config.model_init)")]
  hint = next((f" (it looks like {what})" for prefix, what in hints
               if any(k.startswith(prefix) for k in keys)), "")
  raise ValueError(f"{source} is not an EoMT checkpoint of the official release: no "
                   f"{' or '.join(_OFFICIAL_MARKERS)}{hint}. It has {len(keys)} tensor(s), e.g. "
                   f"{key_list(keys, 8)}")


def _read_hf(path: str, trust_pickle: bool, fmt: str = HF) -> tuple[dict, dict[str, np.ndarray]]:
  dinov3_vit = fmt == HF_DINOV3
  config, tensors = read_hf_model_dir(
      path, "eomt_dinov3" if dinov3_vit else "eomt", fmt=fmt,
      name="EoMT-DINOv3" if dinov3_vit else "EoMT", trust_pickle=trust_pickle)
  if dinov3_vit:
    dinov3.check_hf_config(config, path)  # (its gated MLP runs SiLU)
    if config.get("use_gated_mlp"):
      raise ValueError(f"{path}/config.json: use_gated_mlp=True: transformers' EoMT-DINOv3 "
                       f"then runs its head (mask MLP, up-scaling) with hidden_act "
                       f"{config.get('hidden_act')!r} too; our EoMT head is GELU, as the "
                       "release's (whose DINOv3 models have the plain MLP)")
  bad = hf_unsupported({**config, "hidden_act": "gelu"} if dinov3_vit else config)
  for k in ("image_size", "patch_size"):
    if not isinstance(config.get(k, 0), int):
      bad[k] = config[k]
  if bad:
    raise ValueError(f"{path}/config.json: {bad}; our EoMT has exact GELU, RGB input and "
                     "square images and patches")
  patch = config.get("patch_size", 16)
  ups = config.get("num_upscale_blocks", 2)
  if ups != eomt_model.num_upscale_blocks(patch):
    raise ValueError(f"{path}/config.json: num_upscale_blocks={ups}; our EoMT derives it from "
                     f"the patch size ({eomt_model.num_upscale_blocks(patch)} at patch {patch}, "
                     "as the release)")
  return config, tensors


# ----------------------------------------------------------------------------------------------
# The model a file holds

@dataclasses.dataclass
class EoMTCheckpoint:
  """A whole EoMT read from a foreign file: params, our model config, pixel statistics
  (0-255) and class names."""

  params: dict
  model: dict
  mean: tuple[float, ...]
  std: tuple[float, ...]
  class_names: tuple[str, ...]


def resolved_backbone(bb: Mapping[str, Any]) -> dict[str, Any]:
  """Every ViT field a backbone config means: class defaults < the variant < explicit
  fields."""
  fields = {f.name: f.default for f in dataclasses.fields(vit.ViT)
            if f.default is not dataclasses.MISSING and f.name not in ("dtype", "name",
                                                                       "parent")}
  return {**fields, **eomt_model.backbone_fields(dict(bb))}


def _inferred_model(flat: Flat, fmt: str, source: str, *, num_heads: int | None,
                    num_blocks: int | None, hf_config: Mapping[str, Any] | None,
                    vit_fields: Mapping[str, Any] | None = None) -> dict:
  """Our model config from the converted shapes and what the file records (`vit_fields`: the
  DINOv3 ViT fields of a release file on DINOv3, from its backbone or the release's
  defaults)."""
  prefix = P + "backbone/"
  backbone_flat = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
  width = backbone_flat["embedding/kernel"].shape[-1] if "embedding/kernel" in backbone_flat \
      else None
  if num_heads is None and width not in HEADS_BY_WIDTH:
    raise ValueError(f"{source} does not record the attention heads and its width {width} is "
                     f"not a standard DINOv2 width ({sorted(HEADS_BY_WIDTH)}): give "
                     "--config configs/X.py[:ARG] describing the model")
  pos = backbone_flat.get("pos_embedding")
  if pos is not None and not is_square(pos.shape[1] - 1):
    raise ValueError(f"{source}: the position table has {pos.shape[1] - 1} rows besides the cls "
                     "slot, not a square grid g*g")
  if num_blocks is None:
    raise ValueError(f"{source} does not record num_blocks (L2, the blocks that see the "
                     f"queries): no {MASK_PROBS[fmt]} buffer. Give --config configs/X.py[:ARG] "
                     "describing the model")
  fields: dict[str, Any] = dict(norm_eps=RELEASE_NORM_EPS, layerscale=RELEASE_LAYERSCALE,
                                posemb_resize=POSEMB_RESIZE[fmt])
  if vit_fields is not None:
    fields.update(dinov3.vit_fields(backbone_flat, **vit_fields))
  if hf_config is not None:
    if fmt == HF_DINOV3:
      fields.update(dinov3.hf_vit_fields(hf_config, backbone_flat))
    fields.update(norm_eps=float(hf_config.get("layer_norm_eps", 1e-6)),
                  layerscale=float(hf_config.get("layerscale_value", 1.0)))
    if hf_config.get("drop_path_rate"):
      fields["drop_path"] = float(hf_config["drop_path_rate"])
  backbone = infer_backbone(backbone_flat, num_heads=num_heads, source=source, **fields)
  if backbone["variant"] is None:
    del backbone["variant"]
  classes, queries = flat.get(P + "head/class_head/kernel"), flat.get(P + "queries")
  if classes is None or queries is None:
    raise ValueError(f"{source}: no class head or queries: not a whole EoMT")
  return {"name": "eomt", "num_classes": int(classes.shape[-1]) - 1,
          "num_queries": int(queries.shape[0]), "num_blocks": int(num_blocks),
          "backbone": backbone}


def _check_config(model_cfg: Mapping[str, Any], inferred: Mapping[str, Any],
                  recorded: Mapping[str, str], source: str,
                  described_by: str = "the config") -> None:
  """`--config`'s model (or the one a file we wrote records) against the file: the shapes, and
  `recorded` (field -> where the file records it) of the fields shapes do not show;
  differences named."""
  if model_cfg.get("name") != "eomt":
    raise ValueError(f"{described_by} describes a {model_cfg.get('name')!r} model; EoMT "
                     "checkpoints are model.name='eomt' models")
  want, got = resolved_backbone(model_cfg["backbone"]), resolved_backbone(inferred["backbone"])
  bad = [f"backbone.{k}: config {want[k]}, file {got[k]}"
         for k in ("width", "depth", "mlp_dim", "ffn", "patch_size", "num_registers",
                   "rope_theta", "qkv_bias", "key_bias")
         if want[k] != got[k]]
  if "num_heads" in recorded and want["num_heads"] != got["num_heads"]:
    bad.append(f"backbone.num_heads: config {want['num_heads']}, file {got['num_heads']} "
               f"({recorded['num_heads']})")
  for k in ("num_classes", "num_queries", "num_blocks"):
    if model_cfg[k] != inferred[k]:
      where = f" ({recorded[k]})" if k in recorded else ""
      bad.append(f"{k}: config {model_cfg[k]}, file {inferred[k]}{where}")
  if bad:
    raise ValueError(f"{source} does not hold the model {described_by} describes: "
                     + "; ".join(bad))


def _meta_model(meta: Mapping[str, Any]) -> dict:
  """Our model config in the meta of a file this module wrote, else {}."""
  ours = meta.get("segvit_jax") if isinstance(meta.get("segvit_jax"), dict) else {}
  model = ours.get("model")
  return model if isinstance(model, dict) and model.get("name") == "eomt" else {}


def is_delta(tensors: Mapping[str, np.ndarray]) -> bool:
  """Whether a release file holds delta weights (`delta_weights: True`, the release's DINOv3
  checkpoints): its `network.encoder.pixel_std` buffer is zero. The release's loader adds the
  file to the model it built, whose pixel buffers are fixed at ImageNet's, so a delta file
  that loads there stores zeros in them (it must hold every key of the model, buffers
  included: `_add_state_dicts`), while a full file stores the std itself, never zero (the model
  divides by it). A file without the buffer is read as full weights."""
  std = tensors.get(PIXEL_STD)
  return std is not None and not np.any(std)


def _delta_buffers(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A delta file's buffers plus what the release's model holds before it adds them (its
  ImageNet pixel buffers, `attn_mask_probs` ones): the values the release runs."""
  out = dict(tensors)
  for key, fresh in ((PIXEL_MEAN, RELEASE_PIXEL_MEAN_01), (PIXEL_STD, RELEASE_PIXEL_STD_01)):
    out[key] = np.asarray(fresh, np.float32).reshape(np.shape(tensors[key])) + tensors[key]
  if MASK_PROBS[OFFICIAL] in tensors:
    out[MASK_PROBS[OFFICIAL]] = np.float32(RELEASE_MASK_PROBS) + tensors[MASK_PROBS[OFFICIAL]]
  return out


def _backbone_delta(flat: Flat, base: Converted, source: str, base_path: str,
                    sign: float) -> Flat:
  """`flat` (our EoMT's parameters) with the DINOv3 ViT `base` added to (`sign` 1: import, as
  the release's `_add_state_dicts`) or subtracted from (-1: a delta export) its backbone, in
  float32. The encoder and `base` must hold the same tensors with the same shapes."""
  prefix = P + "backbone/"
  ours = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
  missing, extra = sorted(set(ours) - set(base.params)), sorted(set(base.params) - set(ours))
  shapes = [f"{k} {np.shape(ours[k])} vs {np.shape(base.params[k])}" for k in sorted(ours)
            if k in base.params and np.shape(ours[k]) != np.shape(base.params[k])]
  if missing or extra or shapes:
    problems = [f"{what} ({len(keys)}): {key_list(keys, 8)}" for what, keys in (
        ("not in the backbone", missing), ("only in the backbone", extra),
        ("shapes differ", shapes)) if keys]
    raise ValueError(f"{source}: the DINOv3 backbone {base_path} (width "
                     f"{base.backbone['width']}, depth {base.backbone['depth']}) does not fit "
                     f"this EoMT's encoder: " + "; ".join(problems))
  out = dict(flat)
  for k, v in ours.items():
    out[prefix + k] = np.asarray(v, np.float32) + np.float32(sign) * np.asarray(
        base.params[k], np.float32)
  return out


def _missing_backbone_message(path: str, tensors: Mapping[str, np.ndarray]) -> str:
  width = tensors[_OFFICIAL_DINOV3_MARKER].shape[0]
  name = dinov3.RELEASE_NAMES.get(width)
  which = (f"the facebookresearch/dinov3 dinov3_{name}_pretrain_lvd1689m-*.pth, or a "
           f"transformers directory of facebook/dinov3-{name}-pretrain-lvd1689m" if name else
           "a facebookresearch/dinov3 .pth or a transformers DINOv3ViTModel directory")
  return (f"{path} holds delta weights ({PIXEL_STD} is zero): the release's DINOv3 checkpoints "
          "store the fine-tuned encoder minus the DINOv3 weights it started from. Give those "
          f"weights with --backbone (width {width}: {which})")


def load(path: str, fmt: str, config: ml_collections.ConfigDict | str | None = None, *,
         trust_pickle: bool = False, backbone: str | None = None) -> EoMTCheckpoint:
  """Reads a whole EoMT of layout `fmt` (FORMATS), checked strictly against the model it holds
  (with `config`: the config's model, which must agree with the file). `backbone`: the DINOv3
  ViT (`dinov3.read_backbone`) a release file of delta weights (`is_delta`) is added to."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist (format {fmt!r})")
  hf_config, meta = None, {}
  recorded: dict[str, str] = {}
  base, vit_fields = None, None
  if fmt == OFFICIAL:
    tensors, meta = read_torch_checkpoint(path, trust_pickle=trust_pickle)
    tensors = _official_tensors(tensors, path)
    num_heads = None
    if _OFFICIAL_DINOV3_MARKER in tensors:
      rules = official_dinov3_rules("swiglu" if _OFFICIAL_DINOV3_SWIGLU in tensors else "mlp")
      if is_delta(tensors):
        if backbone is None:
          raise ValueError(_missing_backbone_message(path, tensors))
        base = dinov3.read_backbone(backbone, trust_pickle=trust_pickle)
        tensors = _delta_buffers(tensors)
        num_heads = base.backbone["num_heads"]
        recorded["num_heads"] = f"the backbone {backbone}"
        vit_fields = {k: base.backbone[k] for k in dinov3.ROPE_FIELDS}
      else:
        num_heads = dinov3.HEADS_BY_WIDTH.get(tensors[_OFFICIAL_DINOV3_MARKER].shape[0])
        vit_fields = dict(rope_theta=dinov3.ROPE_THETA, norm_eps=dinov3.NORM_EPS,
                          **dinov3.RELEASE_ROPE)
    else:
      if is_delta(tensors):
        raise ValueError(f"{path} holds delta weights ({PIXEL_STD} is zero) on a DINOv2 (timm) "
                         "encoder; the release stores delta weights for its DINOv3 models "
                         "only, and only those are read")
      rules = official_rules(timm.ffn_of(tensors, "network.encoder.backbone.blocks.0.mlp."))
    if backbone is not None and base is None:
      raise ValueError(f"--backbone {backbone}: {path} holds full weights ({PIXEL_STD} is not "
                       "zero), not delta weights; convert it without --backbone")
  elif fmt in HF_FORMATS:
    hf_config, tensors = _read_hf(path, trust_pickle, fmt)
    if fmt == HF:
      packed = any(".mlp.weights_in." in k for k in tensors)
      rules = hf_rules("swiglu" if hf_config.get("use_swiglu_ffn") else "mlp",
                       packed_swiglu=packed)
    else:
      rules = hf_dinov3_rules("swiglu" if hf_config.get("use_gated_mlp") else "mlp")
    num_heads = hf_config.get("num_attention_heads")
    recorded["num_heads"] = f"{path}/config.json num_attention_heads"
  else:
    raise ValueError(f"unknown EoMT format {fmt!r}; known: {', '.join(FORMATS)}")
  if backbone is not None and fmt != OFFICIAL:
    raise ValueError(f"--backbone applies to --from {OFFICIAL} (the release's delta-weight "
                     f"files); {fmt} files hold full weights")
  flat = to_ours(tensors, rules, source=path, layout=fmt, dropped=DROPPED[fmt])
  if base is not None:
    flat = _backbone_delta(flat, base, path, backbone, 1.0)

  num_blocks = None
  probs = tensors.get(MASK_PROBS[fmt])
  if hf_config is not None and "num_blocks" in hf_config:
    num_blocks = int(hf_config["num_blocks"])
    recorded["num_blocks"] = f"{path}/config.json num_blocks"
  elif probs is not None:
    num_blocks = int(np.asarray(probs).size)
    recorded["num_blocks"] = f"{MASK_PROBS[fmt]} has {num_blocks} entries"
  if probs is not None and np.any(np.asarray(probs) > 0):
    logging.warning("%s: %s = %s: saved before masked attention was annealed away, so its "
                    "source still masks some queries at inference; the bundle runs unmasked "
                    "(EoMT's inference)", path, MASK_PROBS[fmt], np.asarray(probs).tolist())

  model_cfg, described_by = None, "the config"
  if config is not None:
    config = load_config(config)
    model_cfg = config.model.to_dict()
  elif _meta_model(meta):  # a file this module wrote: our model config, checked as a config
    model_cfg, described_by = _meta_model(meta), "the model config the file records"
  if model_cfg is not None:
    want = resolved_backbone(model_cfg["backbone"])
    inferred = _inferred_model(flat, fmt, path, num_heads=num_heads or want["num_heads"],
                               num_blocks=num_blocks or model_cfg["num_blocks"],
                               hf_config=hf_config, vit_fields=vit_fields)
    _check_config(model_cfg, inferred, recorded, path, described_by)
    bb, got = model_cfg["backbone"], inferred["backbone"]
    for k in ("norm_eps", "posemb_resize"):
      if k in bb and bb[k] != got[k]:
        logging.warning("%s: %s says backbone.%s=%r; the bundle records %r, as the %s weights "
                        "are run", path, described_by, k, bb[k], got[k], fmt)
    # The file's grid (nothing is resampled; a release file on DINOv3 records none: the
    # config's stays) and the source's runtime.
    bb.update(norm_eps=got["norm_eps"], posemb_resize=got["posemb_resize"])
    if vit_fields is None or "posemb_grid" not in bb:
      bb["posemb_grid"] = got["posemb_grid"]
  else:
    model_cfg = _inferred_model(flat, fmt, path, num_heads=num_heads, num_blocks=num_blocks,
                                hf_config=hf_config, vit_fields=vit_fields)
  # Strictly against the model: a missing, unexpected or mis-shaped tensor fails naming the
  # keys.
  params = bundle_lib.merge_params(abstract_variables(model_cfg)["params"], unflatten(
      {k[len(P):]: v for k, v in flat.items()}), source=path)
  mean, std = _mean_std(path, fmt, tensors, config, meta)
  return EoMTCheckpoint(params, model_cfg, mean, std,
                        _class_names(config, hf_config, meta, model_cfg["num_classes"]))


def _mean_std(path: str, fmt: str, tensors: Mapping[str, np.ndarray], config,
              meta: Mapping[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Pixel statistics (0-255): the file's (the release's buffers on the 0-1 scale, HF's
  preprocessor_config.json), else the config's, else ImageNet's."""
  recorded = None
  if fmt == OFFICIAL and PIXEL_MEAN in tensors and PIXEL_STD in tensors:
    recorded = tuple(tuple(round(float(v) * 255, 4) for v in np.ravel(tensors[k]))
                     for k in (PIXEL_MEAN, PIXEL_STD))
  elif fmt in HF_FORMATS:
    recorded = hf_mean_std(path, None)
  if recorded is None:
    ours = meta.get("segvit_jax") if isinstance(meta.get("segvit_jax"), dict) else {}
    if config is not None:
      return tuple(config.mean), tuple(config.std)
    if ours.get("mean") and ours.get("std"):
      return tuple(ours["mean"]), tuple(ours["std"])
    return IMAGENET_MEAN_STD
  mean, std = (tuple(float(v) for v in x) for x in recorded)
  if config is not None and not (np.allclose(config.mean, mean, atol=1e-3)
                                 and np.allclose(config.std, std, atol=1e-3)):
    logging.warning("%s was trained with pixel mean %s, std %s (0-255); the config says %s, %s: "
                    "the bundle records the file's", path, mean, std, tuple(config.mean),
                    tuple(config.std))
  return mean, std


def _class_names(config, hf_config, meta: Mapping[str, Any], k: int) -> tuple[str, ...]:
  names = None
  if config is not None:
    names = class_names(config)
  elif hf_config is not None:
    names = hf_class_names(hf_config, k)
  elif meta.get("CLASSES") is not None and len(meta["CLASSES"]) == k:
    names = tuple(str(n) for n in meta["CLASSES"])
  return names or tuple(f"class_{i}" for i in range(k))


def convert(src: str, out: str, fmt: str, config: ml_collections.ConfigDict | str | None = None,
            *, trust_pickle: bool = False, backbone: str | None = None) -> str:
  """A whole EoMT file of layout `fmt` -> a bundle at `out` (`backbone`: the DINOv3 ViT a
  delta-weight release file is added to)."""
  config, extra = with_recorded(config)  # --config: the bundle records its spec and `eval`
  ckpt = load(src, fmt, config, trust_pickle=trust_pickle, backbone=backbone)
  if backbone is not None:
    extra["options"] = {**extra.get("options", {}), "backbone": os.path.abspath(backbone)}
  return bundle_lib.save_bundle(
      out, ckpt.params, ckpt.model, mean=ckpt.mean, std=ckpt.std, class_names=ckpt.class_names,
      source=os.path.abspath(src), source_format=fmt, **extra)


# ----------------------------------------------------------------------------------------------
# Export

def _hf_mlp_ratio(bb: Mapping[str, Any]) -> int | None:
  """transformers' integer mlp_ratio giving the bundle's FFN width (SwiGLU: DINOv2's 2/3 rule
  of it), or None."""
  d = bb["width"]
  for ratio in range(1, 17):
    hidden = d * ratio
    if (vit.swiglu_hidden(hidden) if bb["ffn"] == "swiglu" else hidden) == bb["mlp_dim"]:
      return ratio
  return None


def _check_exportable(model_cfg: Mapping[str, Any], fmt: str, source: str) -> dict[str, Any]:
  """The resolved backbone; what the layout cannot express fails, named."""
  bb = resolved_backbone(model_cfg["backbone"])
  need = dict(cls_token=True, cls_in_blocks=True, final_norm=True)
  bad = [f"backbone.{k}={bb[k]!r} (the layout: {v!r})" for k, v in need.items() if bb[k] != v]
  rope = bb["rope_theta"] is not None
  if fmt != OFFICIAL and rope != (fmt == HF_DINOV3):  # (the release's has both encoders)
    bad.append(f"backbone.rope_theta={bb['rope_theta']!r} (" + (
        "a DINOv3 backbone with rotary position embeddings: --to hf-eomt-dinov3 or "
        "eomt-official" if rope else
        "a learned position table: the DINOv3 layout has none; --to hf-eomt") + ")")
  if bb["layerscale"] is None:
    bad.append("backbone.layerscale=None (the layout's blocks have LayerScale)")
  if bb["posemb_grid"][0] != bb["posemb_grid"][1] and not (rope and fmt == OFFICIAL):
    bad.append(f"backbone.posemb_grid={tuple(bb['posemb_grid'])} (the layout stores a square "
               "grid)")
  if not rope and not (bb["qkv_bias"] and bb["key_bias"]):
    bad.append("backbone.qkv_bias / key_bias off (the layout's attention has every bias)")
  if rope and fmt == OFFICIAL and bb["key_bias"]:
    bad.append("backbone.key_bias=True (the release's DINOv3 ViTs have no key bias)")
  if fmt == HF_DINOV3 and bb["ffn"] != "mlp":
    bad.append(f"backbone.ffn={bb['ffn']!r} (transformers' EoMT-DINOv3 would run its head with "
               "the gated MLP's SiLU; our head is GELU)")
  if fmt == HF and _hf_mlp_ratio(bb) is None:
    bad.append(f"backbone.mlp_dim={bb['mlp_dim']} ({bb['ffn']}): not an integer mlp_ratio of "
               f"width {bb['width']}, as transformers' config needs")
  if bad:
    raise ValueError(f"{source}: the {fmt} layout cannot express this model: " + "; ".join(bad))
  want_eps = dinov3.NORM_EPS if rope else RELEASE_NORM_EPS
  if fmt == OFFICIAL and bb["norm_eps"] != want_eps:
    logging.warning("%s runs its LayerNorms with eps %s; the release's %s ViT uses %s: written "
                    "unchanged", source, bb["norm_eps"], "DINOv3" if rope else "timm", want_eps)
  return bb


def _fold_cls_slot(flat: Flat, source: str) -> Flat:
  """Our cls slot of the position table added to the cls token (both layouts give the cls
  token no position); zero slots leave both bitwise unchanged."""
  pos_key, cls_key = P + "backbone/pos_embedding", P + "backbone/cls"
  pos = flat[pos_key]
  if not np.any(pos[:, :1]):
    return flat
  logging.info("%s: folding the cls position into the cls token (the layouts have no cls "
               "position)", source)
  flat = dict(flat)
  flat[cls_key] = flat[cls_key] + pos[:, :1]
  flat[pos_key] = np.concatenate([np.zeros_like(pos[:, :1]), pos[:, 1:]], 1)
  return flat


def _export_state(bundle_path: str, fmt: str, delta_from: str | None = None
                  ) -> tuple[dict, dict, dict]:
  """(bundle config, resolved backbone, the layout's state dict as numpy, buffers included);
  `delta_from` (release layout, DINOv3 bundles): the encoder minus that DINOv3 ViT."""
  meta = bundle_lib.read_config(bundle_path)
  name = meta.get("model", {}).get("name", "segvit")
  if name != "eomt":
    raise ValueError(f"{bundle_path} is a {name!r} bundle; --to {fmt} writes whole EoMT models "
                     "(a bundle of model.name='eomt')")
  model_cfg = meta["model"]
  bb = _check_exportable(model_cfg, fmt, bundle_path)
  loaded = bundle_lib.load_bundle(bundle_path)  # strict check against its model
  flat = {P + k: np.asarray(v) for k, v in flatten(loaded.variables["params"]).items()}
  if delta_from is not None:
    if bb["rope_theta"] is None:
      raise ValueError(f"--delta_from {delta_from}: {bundle_path} is an EoMT on a DINOv2-style "
                       "ViT (a learned position table); the release stores delta weights for "
                       "its DINOv3 models only")
    flat = _backbone_delta(flat, dinov3.read_backbone(delta_from), bundle_path, delta_from, -1.0)
  if fmt == HF_DINOV3:
    rules = hf_dinov3_rules(bb["ffn"])
  elif fmt == OFFICIAL and bb["rope_theta"] is not None:
    rules = official_dinov3_rules(bb["ffn"])
  else:
    flat = _fold_cls_slot(flat, bundle_path)
    rules = official_rules(bb["ffn"]) if fmt == OFFICIAL else hf_rules(bb["ffn"])
  state = to_theirs(flat, rules, source=bundle_path, layout=fmt)
  k = model_cfg["num_classes"]
  # Fully annealed (module docstring); the loss's class weights, no-object last.
  state[MASK_PROBS[fmt]] = np.zeros(model_cfg["num_blocks"], np.float32)
  state[EMPTY_WEIGHT] = class_weights(k, no_object_weight(meta, NO_OBJECT_WEIGHT))
  return meta, bb, state


def _pixel_stats(meta: Mapping[str, Any]) -> tuple[list[float], list[float]]:
  return (list(meta.get("mean") or IMAGENET_MEAN_STD[0]),
          list(meta.get("std") or IMAGENET_MEAN_STD[1]))


def export_official(bundle_path: str, out: str, delta_from: str | None = None
                    ) -> dict[str, np.ndarray]:
  """An EoMT bundle -> a release checkpoint at `out`: torch.save of {"state_dict": float32
  tensors (the LightningModule's names, buffers included), "meta": {CLASSES, segvit_jax: model
  config, pixel statistics, source}}, readable with torch.load(weights_only=True). Returns the
  state dict as numpy arrays. The encoder is timm's DINOv2 or, for a bundle on DINOv3,
  transformers' DINOv3ViTModel as the release names it (`official_dinov3_rules`).

  `delta_from` (a DINOv3 ViT, `dinov3.read_backbone`) writes the release's delta form, what its
  `delta_weights: True` loader adds to the model it builds: the encoder minus those weights,
  the pixel buffers minus its fixed ImageNet ones (the std's zeros mark the file: `is_delta`;
  a bundle of another pixel std is refused), `attn_mask_probs` minus its fresh ones (-1, so
  that it loads fully annealed), everything else as it is."""
  meta, _, state = _export_state(bundle_path, OFFICIAL, delta_from)
  mean, std = _pixel_stats(meta)
  for key, values in ((PIXEL_MEAN, mean), (PIXEL_STD, std)):
    state[key] = (np.asarray(values, np.float64) / 255).astype(np.float32).reshape(1, -1, 1, 1)
  if delta_from is not None:
    for key, fresh in ((PIXEL_MEAN, RELEASE_PIXEL_MEAN_01), (PIXEL_STD, RELEASE_PIXEL_STD_01),
                       (MASK_PROBS[OFFICIAL], RELEASE_MASK_PROBS)):
      state[key] = state[key] - np.asarray(fresh, np.float32).reshape(
          np.shape(state[key]) if np.ndim(fresh) else ())
    if np.any(state[PIXEL_STD]):
      raise ValueError(f"--delta_from: {bundle_path} has pixel std {tuple(std)} (0-255), not the "
                       "ImageNet std of the release's buffers: its delta file could not be told "
                       "from a full one (a zero pixel_std delta marks delta files); write it in "
                       "full (without --delta_from)")
  state = {k: state[k] for k in sorted(state, key=natural_key)}
  info = {"model": meta["model"], "mean": mean, "std": std,
          "source": os.path.abspath(bundle_path)}
  if delta_from is not None:
    info["delta_from"] = os.path.abspath(delta_from)
  write_torch_checkpoint(out, state, {"CLASSES": tuple(labels(meta)),
                                      "segvit_jax": json.loads(json.dumps(info, default=list))})
  return state


def hf_config(meta: Mapping[str, Any], bb: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """config.json of EomtForUniversalSegmentation for an EoMT bundle's config."""
  model = meta["model"]
  bb = bb or resolved_backbone(model["backbone"])
  names = labels(meta)
  patch = int(bb["patch_size"])
  return {
      "architectures": ["EomtForUniversalSegmentation"], "model_type": "eomt",
      "hidden_size": int(bb["width"]), "num_hidden_layers": int(bb["depth"]),
      "num_attention_heads": int(bb["num_heads"]), "mlp_ratio": _hf_mlp_ratio(bb),
      "use_swiglu_ffn": bb["ffn"] == "swiglu", "hidden_act": "gelu",
      "hidden_dropout_prob": 0.0, "attention_dropout": 0.0,
      "drop_path_rate": float(bb.get("drop_path") or 0.0), "initializer_range": 0.02,
      "layer_norm_eps": float(bb["norm_eps"]), "layerscale_value": float(bb["layerscale"]),
      "image_size": int(bb["posemb_grid"][0]) * patch, "patch_size": patch, "num_channels": 3,
      "num_register_tokens": int(bb["num_registers"]),
      "num_upscale_blocks": eomt_model.num_upscale_blocks(patch),
      "num_blocks": int(model["num_blocks"]), "num_queries": int(model["num_queries"]),
      "no_object_weight": no_object_weight(meta, NO_OBJECT_WEIGHT),
      "id2label": {str(i): n for i, n in enumerate(names)},
      "label2id": {n: i for i, n in enumerate(names)},
  }


def hf_dinov3_config(meta: Mapping[str, Any], bb: Mapping[str, Any] | None = None
                     ) -> dict[str, Any]:
  """config.json of EomtDinov3ForUniversalSegmentation for an EoMT-on-DINOv3 bundle's config."""
  model = meta["model"]
  bb = bb or resolved_backbone(model["backbone"])
  config = hf_config(meta, bb)
  for k in ("mlp_ratio", "use_swiglu_ffn"):
    del config[k]
  gated = bb["ffn"] == "swiglu"
  config.update(
      architectures=["EomtDinov3ForUniversalSegmentation"], model_type="eomt_dinov3",
      intermediate_size=int(bb["mlp_dim"]), use_gated_mlp=gated,
      hidden_act="silu" if gated else "gelu",
      rope_parameters={"rope_theta": float(bb["rope_theta"]), "rope_type": "default"},
      query_bias=bool(bb["qkv_bias"]), value_bias=bool(bb["qkv_bias"]),
      key_bias=bool(bb["qkv_bias"] and bb["key_bias"]), proj_bias=True, mlp_bias=True,
      pos_embed_shift=bb["rope_shift"], pos_embed_jitter=bb["rope_jitter"],
      pos_embed_rescale=bb["rope_rescale"])
  return config


def export_hf(bundle_path: str, out: str, fmt: str = HF) -> dict[str, np.ndarray]:
  """An EoMT bundle -> a directory EomtForUniversalSegmentation.from_pretrained loads
  (`fmt` hf-eomt-dinov3: EomtDinov3ForUniversalSegmentation's): config.json,
  model.safetensors (float32) and preprocessor_config.json (the bundle's mean / std; EoMT's
  semantic inference). Returns the state dict."""
  meta, bb, state = _export_state(bundle_path, fmt)
  config = (hf_dinov3_config if fmt == HF_DINOV3 else hf_config)(meta, bb)
  mean, std = _pixel_stats(meta)
  write_hf_dir(out, state, config, {
      "image_processor_type": "EomtImageProcessor", "do_resize": True,
      "size": {"shortest_edge": config["image_size"], "longest_edge": None}, "resample": 2,
      "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
      "image_mean": [m / 255 for m in mean], "image_std": [s / 255 for s in std],
      "do_split_image": True, "do_pad": False})
  return state


def summary(model: Mapping[str, Any]) -> str:
  """One line for the CLI: 'EoMT dinov2-L/16-reg4 width 1024 depth 24 ... classes 150'."""
  bb = resolved_backbone(model["backbone"])
  name = model["backbone"].get("variant") or "ViT"
  return (f"EoMT {name} width {bb['width']} depth {bb['depth']} heads {bb['num_heads']} "
          f"patch {bb['patch_size']} grid {tuple(bb['posemb_grid'])} "
          f"registers {bb['num_registers']} queries {model['num_queries']} "
          f"num_blocks {model['num_blocks']} classes {model['num_classes']} "
          + (f"rope_theta {bb['rope_theta']:g}" if bb["rope_theta"] is not None else
             f"posemb_resize {bb['posemb_resize']}"))
