"""HuggingFace transformers checkpoints: the directory `save_pretrained` writes for ViTModel
(`hf-vit`) and Dinov2Model / Dinov2WithRegistersModel (`hf-dinov2`), also inside the
...ForImageClassification wrappers (`vit.` / `dinov2.` prefixes; the classifier is dropped).
Weights from `model.safetensors`, a sharded `model.safetensors.index.json`, or
`pytorch_model.bin`; sizes, LayerNorm eps and head count from `config.json`; pixel statistics
from `preprocessor_config.json` when present.

Run-time position-embedding resize as transformers does it: bicubic without antialias for
ViTModel and Dinov2Model, with antialias for Dinov2WithRegistersModel.
"""

from __future__ import annotations

import json
import os

from segvit_jax.convert.mapping import Converted, Rule, add_cls_slot, apply_rules, conv, \
    infer_backbone, linear, read_safetensors, read_torch, split_swiglu, strip_prefix, \
    AUGREG_MEAN_STD, IMAGENET_MEAN_STD

_LAYER = r"encoder\.layer\.(\d+)\."


def _dense(source: str, target: str) -> tuple[Rule, Rule]:
  return (Rule(source + r"\.weight", target + "/kernel", linear),
          Rule(source + r"\.bias", target + "/bias"))


def _norm(source: str, target: str) -> tuple[Rule, Rule]:
  return (Rule(source + r"\.weight", target + "/scale"), Rule(source + r"\.bias", target + "/bias"))


def swiglu_in(source: str) -> tuple[Rule, Rule]:
  """Packed [gate; value] Linear -> w1 (gate) and w2 (value)."""
  return tuple(Rule(source + rf"\.{part}", (f"encoderblock_{{0}}/mlp/w1/{ours}",
                                              f"encoderblock_{{0}}/mlp/w2/{ours}"), split_swiglu)
               for part, ours in (("weight", "kernel"), ("bias", "bias")))


COMMON_RULES = (
    Rule(r"embeddings\.cls_token", "cls"),
    Rule(r"embeddings\.position_embeddings", "pos_embedding"),
    Rule(r"embeddings\.patch_embeddings\.projection\.weight", "embedding/kernel", conv),
    Rule(r"embeddings\.patch_embeddings\.projection\.bias", "embedding/bias"),
    Rule(r"embeddings\.mask_token", None),
    *_dense(_LAYER + r"attention\.attention\.(query|key|value)", "encoderblock_{0}/attn/{1}"),
    *_dense(_LAYER + r"attention\.output\.dense", "encoderblock_{0}/attn/out"),
    *_norm(r"layernorm", "encoder_norm"),
    Rule(r"(classifier|pooler)\..*", None),
)

VIT_RULES = COMMON_RULES + (
    *_norm(_LAYER + r"layernorm_before", "encoderblock_{0}/norm1"),
    *_norm(_LAYER + r"layernorm_after", "encoderblock_{0}/norm2"),
    *_dense(_LAYER + r"intermediate\.dense", "encoderblock_{0}/mlp/fc1"),
    *_dense(_LAYER + r"output\.dense", "encoderblock_{0}/mlp/fc2"),
)

DINOV2_RULES = COMMON_RULES + (
    Rule(r"embeddings\.register_tokens", "registers"),
    *_norm(_LAYER + r"norm([12])", "encoderblock_{0}/norm{1}"),
    Rule(_LAYER + r"layer_scale([12])\.lambda1", "encoderblock_{0}/ls{1}"),
    *_dense(_LAYER + r"mlp\.(fc[12])", "encoderblock_{0}/mlp/{1}"),
    *swiglu_in(_LAYER + r"mlp\.weights_in"),
    *_dense(_LAYER + r"mlp\.weights_out", "encoderblock_{0}/mlp/w3"),
)


def read_dir(path: str, *, trust_pickle: bool = False) -> tuple[dict, dict]:
  """(config.json, tensors) of a `save_pretrained` directory."""
  cfg_file = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_file):
    raise FileNotFoundError(f"{cfg_file} not found: expected a directory written by "
                            "transformers' save_pretrained (config.json + model.safetensors)")
  with open(cfg_file) as f:
    config = json.load(f)
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
    tensors = {}
    for name in files:
      tensors.update(read_safetensors(os.path.join(path, name)))
  elif os.path.isfile(os.path.join(path, "model.safetensors")):
    tensors = read_safetensors(os.path.join(path, "model.safetensors"))
  elif os.path.isfile(os.path.join(path, "pytorch_model.bin")):
    tensors = read_torch(os.path.join(path, "pytorch_model.bin"), trust_pickle=trust_pickle)
  else:
    raise FileNotFoundError(f"{path}: no model.safetensors(.index.json) or pytorch_model.bin")
  return config, tensors


def _mean_std(path: str, default):
  file = os.path.join(path, "preprocessor_config.json")
  if not os.path.isfile(file):
    return default
  with open(file) as f:
    pre = json.load(f)
  if "image_mean" not in pre or "image_std" not in pre:
    return default
  return (tuple(255.0 * m for m in pre["image_mean"]), tuple(255.0 * s for s in pre["image_std"]))


def _load(path, rules, expected, *, num_heads, trust_pickle, posemb_resize, mean_std):
  config, tensors = read_dir(path, trust_pickle=trust_pickle)
  model_type = config.get("model_type")
  if model_type not in expected:
    raise ValueError(f"{path}/config.json has model_type={model_type!r}; this format reads "
                     f"{' / '.join(expected)}")
  if config.get("hidden_act", "gelu") != "gelu":
    raise ValueError(f"{path}: hidden_act={config['hidden_act']!r}; only exact 'gelu' is "
                     "supported")
  tensors = strip_prefix(tensors, [f"{model_type}.", "vit.", "dinov2."])
  params = add_cls_slot(apply_rules(tensors, rules, source=path, layout=f"HF {model_type}"),
                        path)
  cfg = infer_backbone(params, num_heads=num_heads or config["num_attention_heads"],
                       source=path, norm_eps=config.get("layer_norm_eps", 1e-12),
                       posemb_resize=posemb_resize(model_type))
  return Converted(params, cfg, *_mean_std(path, mean_std))


def load_vit(path: str, *, num_heads: int | None = None, trust_pickle: bool = False,
             **unused) -> Converted:
  del unused
  return _load(path, VIT_RULES, ("vit",), num_heads=num_heads, trust_pickle=trust_pickle,
               posemb_resize=lambda _: "bicubic", mean_std=AUGREG_MEAN_STD)


def load_dinov2(path: str, *, num_heads: int | None = None, trust_pickle: bool = False,
                **unused) -> Converted:
  del unused
  return _load(path, DINOV2_RULES, ("dinov2", "dinov2_with_registers"), num_heads=num_heads,
               trust_pickle=trust_pickle,
               posemb_resize=lambda t: "bicubic_antialias" if "registers" in t else "bicubic",
               mean_std=IMAGENET_MEAN_STD)
