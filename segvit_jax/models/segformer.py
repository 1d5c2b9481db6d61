"""SegFormer (Xie et al., "SegFormer: Simple and Efficient Design for Semantic Segmentation
with Transformers", NeurIPS 2021): the MiT encoder (`mit.MiT`, Sec. 3.1) and the all-MLP
decoder (Sec. 3.2, Eq. (4), Fig. 2).

Output dict of `SegFormer`:
  logits           (B, K, H/4, W/4)  per-pixel class logits on the stage-1 grid (train on these,
                                     resized to the labels, as mmseg does)
  semantic_scores  (B, K, H, W)      the logits bilinearly resized to the input
Variables: {"params", "batch_stats"} (the decoder's BatchNorm); `train=True` needs
`mutable=["batch_stats"]`.

All-MLP decoder: per stage a Dense C_s -> C; every map resized bilinearly (align_corners=False,
torch-identical: `layers.resize_grid`) to the stage-1 grid (1/4); concatenated in the order
[stage 4, 3, 2, 1];
"linear_fuse": 1x1 conv 4C -> C without bias, BatchNorm, ReLU; Dropout; 1x1 conv C -> K.
Returns logits (B, K, h_1, w_1) at 1/4 resolution.

BatchNorm: flax `nn.BatchNorm` with momentum 0.9 (torch's momentum 0.1: running = 0.9 running +
0.1 batch), eps 1e-5; running statistics live in the `batch_stats` collection. `train=True`
normalises with the batch's statistics and updates them (apply with `mutable=["batch_stats"]`),
`train=False` uses the running ones. Synchronised BatchNorm comes for free: the statistics are
a mean over the (global) batch array, so under jit / pjit with the batch sharded over
data-parallel devices XLA reduces across the shards and every replica normalises with, and
stores, the global-batch mean and variance (mmseg's SyncBN; no `axis_name` is needed outside
pmap). One difference from torch: the running variance is updated with the biased batch
variance (torch: unbiased, a factor n / (n - 1) with n = B h w pixels, 1 + 4e-6 at batch 16,
128 x 128).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from segvit_jax.models import cpu_ops, layers, mit


class SegFormerHead(nn.Module):
  """All-MLP decoder over the four MiT stage outputs (B, h_s, w_s, C_s), stage 1 first.

  Parameters: `linear_c_{s}` (s = 1..4), `linear_fuse` (conv, no bias), `batch_norm`,
  `classifier`."""

  num_classes: int
  width: int
  dropout: float = 0.1
  bn_momentum: float = 0.9
  bn_eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jax.Array], *, train: bool = False) -> jax.Array:
    c = self.width
    grid = features[0].shape[1:3]
    maps = []
    for s, feat in enumerate(features, start=1):
      y = nn.Dense(c, dtype=self.dtype, name=f"linear_c_{s}",
                   kernel_init=layers.logical(layers.trunc_normal_02, ("embed", "mlp")),
                   bias_init=layers.logical(nn.initializers.zeros, ("mlp",)))(feat)
      maps.append(layers.resize_grid(y, grid, "bilinear", axes=(1, 2)))
    x = jnp.concatenate(maps[::-1], axis=-1)  # (B, h_1, w_1, 4C): [stage 4, 3, 2, 1]
    x = layers.constrain(x, ("act_batch", None, None, None))
    x = cpu_ops.PointwiseConv(c, use_bias=False, dtype=self.dtype, name="linear_fuse",
                             kernel_init=layers.logical(
                                 nn.initializers.normal(math.sqrt(2.0 / c)),
                                 (None, None, None, "mlp")))(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                     epsilon=self.bn_eps, use_fast_variance=False, dtype=self.dtype,
                     name="batch_norm",
                     scale_init=layers.logical(nn.initializers.ones, ("mlp",)),
                     bias_init=layers.logical(nn.initializers.zeros, ("mlp",)))(x)
    x = layers.constrain(nn.relu(x), ("act_batch", None, None, "act_mlp"))
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    x = cpu_ops.PointwiseConv(self.num_classes, dtype=self.dtype, name="classifier",
                             kernel_init=layers.logical(nn.initializers.normal(0.01),
                                                        (None, None, "mlp", "classes")),
                             bias_init=layers.logical(nn.initializers.zeros, ("classes",)))(x)
    return jnp.transpose(x, (0, 3, 1, 2))  # (B, K, h_1, w_1)


class SegFormer(nn.Module):
  """SegFormer: `backbone` holds MiT fields (incl. `variant`), `head` SegFormerHead's fields
  (`width`, `dropout`); `attention` the MiT's attention implementation
  (`layers.ATTENTION_IMPLEMENTATIONS`)."""

  num_classes: int
  backbone: dict
  head: dict
  attention: str = "auto"
  dtype: Any = jnp.float32

  def setup(self):
    self.encoder = mit.Model(**self.backbone, attention=self.attention, dtype=self.dtype,
                             name="backbone")
    self.decode_head = SegFormerHead(num_classes=self.num_classes, dtype=self.dtype,
                                     name="head", **self.head)

  def __call__(self, images: jax.Array, *, train: bool = False) -> dict[str, Any]:
    features, _ = self.encoder(images.astype(self.dtype), train=train)
    logits = self.decode_head(features, train=train).astype(jnp.float32)
    return {"logits": logits,
            "semantic_scores": layers.upsample_masks(logits, images.shape[1:3])}


def backbone_fields(backbone: Mapping[str, Any]) -> dict[str, Any]:
  """A config's backbone dict -> the segmentor's `backbone` field (lists as tuples)."""
  return {k: tuple(v) if isinstance(v, list) else v for k, v in dict(backbone).items()}


def from_config(model_cfg: Mapping[str, Any], dtype: Any) -> SegFormer:
  """The SegFormer a `config.model` (name "segformer") describes."""
  return SegFormer(num_classes=model_cfg["num_classes"],
                   backbone=backbone_fields(model_cfg["backbone"]),
                   head=dict(model_cfg["head"]), attention=layers.attention_setting(model_cfg),
                   dtype=dtype)


def backbone_from_config(model_cfg: Mapping[str, Any], dtype: Any) -> mit.MiT:
  """The MiT of `from_config`'s model alone (its parameters: the model's "backbone")."""
  return mit.Model(**backbone_fields(model_cfg["backbone"]),
                   attention=layers.attention_setting(model_cfg), dtype=dtype)


def input_divisor(model_cfg: Mapping[str, Any]) -> int:
  """A SegFormer takes any input size; sides that are multiples of the MiT's total stride make
  every stage grid an exact fraction of the input."""
  del model_cfg
  return mit.TOTAL_STRIDE
