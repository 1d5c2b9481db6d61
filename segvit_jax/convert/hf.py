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

from segvit_jax.convert.backbone import AUGREG_MEAN_STD, IMAGENET_MEAN_STD, Converted, \
    add_cls_slot, infer_backbone
from segvit_jax.convert.rules import KeyRule, attention, conv, hf_mean_std, mlp, norm, \
    read_hf_dir, strip_prefix, swiglu, to_ours

_L, _O = "encoder.layer.{i}.", "encoderblock_{i}/"

COMMON_RULES = (
    KeyRule("embeddings.cls_token", "cls"),
    KeyRule("embeddings.position_embeddings", "pos_embedding"),
    *conv("embeddings.patch_embeddings.projection", "embedding"),
    *attention(_L + "attention.", _O + "attn",
               ("attention.query", "attention.key", "attention.value", "output.dense")),
    *norm("layernorm", "encoder_norm"),
)

VIT_RULES = COMMON_RULES + (
    *norm(_L + "layernorm_before", _O + "norm1"),
    *norm(_L + "layernorm_after", _O + "norm2"),
    *mlp(_L, _O + "mlp", ("intermediate.dense", "output.dense")),
)

DINOV2_RULES = COMMON_RULES + (
    KeyRule("embeddings.register_tokens", "registers"),
    *norm(_L + "norm1", _O + "norm1"),
    *norm(_L + "norm2", _O + "norm2"),
    KeyRule(_L + "layer_scale1.lambda1", _O + "ls1"),
    KeyRule(_L + "layer_scale2.lambda1", _O + "ls2"),
    *mlp(_L + "mlp.", _O + "mlp"),
    *swiglu(_L + "mlp.", _O + "mlp", ("weights_in", "weights_out")),
)
DROPPED = (r"embeddings\.mask_token", r"(classifier|pooler)\..*")


def _load(path, rules, expected, *, num_heads, trust_pickle, posemb_resize, mean_std):
  config, tensors = read_hf_dir(path, trust_pickle=trust_pickle)
  model_type = config.get("model_type")
  if model_type not in expected:
    raise ValueError(f"{path}/config.json has model_type={model_type!r}; this format reads "
                     f"{' / '.join(expected)}")
  if config.get("hidden_act", "gelu") != "gelu":
    raise ValueError(f"{path}: hidden_act={config['hidden_act']!r}; only exact 'gelu' is "
                     "supported")
  tensors = strip_prefix(tensors, [f"{model_type}.", "vit.", "dinov2."])
  params = add_cls_slot(to_ours(tensors, rules, source=path, layout=f"HF {model_type}",
                                dropped=DROPPED, model="ViT"), path)
  cfg = infer_backbone(params, num_heads=num_heads or config["num_attention_heads"],
                       source=path, norm_eps=config.get("layer_norm_eps", 1e-12),
                       posemb_resize=posemb_resize(model_type))
  return Converted(params, cfg, *hf_mean_std(path, mean_std))


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
