"""timm ViT checkpoints (.safetensors or .pth): AugReg copies hosted as timm models and
timm's DINOv2 (LayerScale `ls1/ls2.gamma`, `reg_token`, SwiGLU packed into `mlp.fc1`).

timm folds the cls position into `cls_token` for register models (`no_embed_class`): their
`pos_embed` has no cls slot; `mapping.add_cls_slot` tells the two apart by its length.
Run-time position-embedding resize: bicubic with antialias, as timm's
`resample_abs_pos_embed` does.
"""

from __future__ import annotations

from segvit_jax.convert.mapping import Converted, Rule, apply_rules, add_cls_slot, conv, \
    infer_backbone, linear, read_torch, split3, split3_linear, unpack_swiglu, AUGREG_MEAN_STD, \
    IMAGENET_MEAN_STD


def block_rules(block: str) -> tuple[Rule, ...]:
  """Rules for the timm / DINOv2 block layout; `block` is the regex of the block prefix with
  one group, the block index."""
  qkv = tuple(f"encoderblock_{{0}}/attn/{n}/" for n in ("query", "key", "value"))
  return (
      Rule(block + r"norm([12])\.weight", "encoderblock_{0}/norm{1}/scale"),
      Rule(block + r"norm([12])\.bias", "encoderblock_{0}/norm{1}/bias"),
      Rule(block + r"attn\.qkv\.weight", tuple(t + "kernel" for t in qkv), split3_linear),
      Rule(block + r"attn\.qkv\.bias", tuple(t + "bias" for t in qkv), split3),
      Rule(block + r"attn\.proj\.weight", "encoderblock_{0}/attn/out/kernel", linear),
      Rule(block + r"attn\.proj\.bias", "encoderblock_{0}/attn/out/bias"),
      Rule(block + r"ls([12])\.gamma", "encoderblock_{0}/ls{1}"),
      Rule(block + r"mlp\.(fc[12])\.weight", "encoderblock_{0}/mlp/{1}/kernel", linear),
      Rule(block + r"mlp\.(fc[12])\.bias", "encoderblock_{0}/mlp/{1}/bias"),
  )


EMBED_RULES = (
    Rule(r"cls_token", "cls"),
    Rule(r"pos_embed", "pos_embedding"),
    Rule(r"patch_embed\.proj\.weight", "embedding/kernel", conv),
    Rule(r"patch_embed\.proj\.bias", "embedding/bias"),
    Rule(r"norm\.weight", "encoder_norm/scale"),
    Rule(r"norm\.bias", "encoder_norm/bias"),
)

RULES = EMBED_RULES + block_rules(r"blocks\.(\d+)\.") + (
    Rule(r"reg_token", "registers"),
    Rule(r"(head|fc_norm)\..*", None),  # classifier
)


def load(path: str, *, num_heads: int | None = None, trust_pickle: bool = False,
         **unused) -> Converted:
  del unused
  tensors = read_torch(path, trust_pickle=trust_pickle)
  params = unpack_swiglu(apply_rules(tensors, RULES, source=path, layout="timm"))
  params = add_cls_slot(params, path)
  cfg = infer_backbone(params, num_heads=num_heads, source=path, norm_eps=1e-6,
                       posemb_resize="bicubic_antialias")
  # LayerScale marks the DINOv2 family (ImageNet statistics); AugReg copies use 0.5 / 0.5.
  mean_std = IMAGENET_MEAN_STD if cfg["layerscale"] is not None else AUGREG_MEAN_STD
  return Converted(params, cfg, *mean_std)
