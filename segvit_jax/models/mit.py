"""Mix Transformer (MiT) B0-B5, SegFormer's hierarchical encoder (Xie et al., NeurIPS 2021,
Sec. 3.1, Eq. (1)-(3), Fig. 2; sizes: Appendix A, Table 6).

Four stages at strides 4, 8, 16, 32. Each stage: an overlapping patch embedding (a strided
Conv with "same"-style padding, k7 s4 p3 in stage 1 and k3 s2 p1 after, then LayerNorm), blocks
of pre-norm efficient self-attention and Mix-FFN, and a closing LayerNorm.
  Efficient self-attention: queries from all tokens; keys / values from the sequence reduced
  by a Conv with kernel = stride = sr and a LayerNorm (stages with sr > 1), `layers.Attention`.
  Mix-FFN: fc1 -> depthwise 3x3 conv (with bias) -> GELU (exact erf) -> fc2; the depthwise
  conv replaces a position embedding, so any input size works. Feature-map sizes follow the
  convs: floor((H + 2p - k) / s) + 1 per stage, as in torch.

`norm_eps` is the epsilon of the block norms and of the norms closing the stages: 1e-6 in the
authors' release (`partial(nn.LayerNorm, eps=1e-6)`), 1e-5 in transformers'
`SegformerForSemanticSegmentation` (every LayerNorm there is built with torch's default; its
config's `layer_norm_eps=1e-6` is read nowhere). The patch-embedding and key / value reduction
norms use `embed_norm_eps` = 1e-5 in both. Use the eps of the weights you load.

`Model(variant="B2", ...)` decodes a size name (VARIANTS); explicit fields override it. The
model returns `(features, aux)`: `features` the four stage outputs (B, h_s, w_s, C_s), stage 1
first; `aux["blocks"]` every block's output (B, h_s, w_s, C_s), in order.

Parameter names: `patch_embed_{s}/{proj,norm}`, `block_{s}_{j}/{norm1, attn/{query,key,value,
out}, sr, sr_norm, norm2, mlp/{fc1,dwconv,fc2}}`, `norm_{s}`, with stages s = 1..4 and blocks
j = 0.. within a stage (the authors' `block{s}.{j}`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from segvit_jax.models import cpu_ops, layers

# name -> (stage widths, blocks per stage); SegFormer Appendix A, Table 6.
VARIANTS = {
    "B0": ((32, 64, 160, 256), (2, 2, 2, 2)),
    "B1": ((64, 128, 320, 512), (2, 2, 2, 2)),
    "B2": ((64, 128, 320, 512), (3, 4, 6, 3)),
    "B3": ((64, 128, 320, 512), (3, 4, 18, 3)),
    "B4": ((64, 128, 320, 512), (3, 8, 27, 3)),
    "B5": ((64, 128, 320, 512), (3, 6, 40, 3)),
}
# The product of the default stage strides: input sides that are multiples of it give every
# stage an exact fraction of the input.
TOTAL_STRIDE = 32


def decode_variant(variant: str) -> dict[str, Any]:
  """"B2" (also "b2", "mit-b2") -> dict(dims=(64, 128, 320, 512), depths=(3, 4, 6, 3))."""
  name = variant.upper().removeprefix("MIT-").removeprefix("MIT_")
  if name not in VARIANTS:
    raise ValueError(f"unknown MiT variant {variant!r}; expected one of {sorted(VARIANTS)}")
  dims, depths = VARIANTS[name]
  return dict(dims=dims, depths=depths)


def _conv_init(kernel_size: Sequence[int], features: int, groups: int = 1) -> layers.Initializer:
  """The release's Conv init: normal with std sqrt(2 / fan_out), fan_out = k*k*out / groups."""
  fan_out = math.prod(kernel_size) * features // groups
  return nn.initializers.normal(math.sqrt(2.0 / fan_out))


def _dense(features: int, axes: tuple[str, str], name: str, dtype: Any) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, name=name,
                  kernel_init=layers.logical(layers.trunc_normal_02, axes),
                  bias_init=layers.logical(nn.initializers.zeros, axes[1:]))


class OverlapPatchEmbed(nn.Module):
  """Strided Conv with padding patch_size // 2, then LayerNorm: (B, H, W, Cin) ->
  (B, floor((H + 2p - k) / s) + 1, ..., features)."""

  features: int
  patch_size: int
  stride: int
  norm_eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, s, p = self.patch_size, self.stride, self.patch_size // 2
    x = nn.Conv(self.features, (k, k), strides=(s, s), padding=((p, p), (p, p)),
                dtype=self.dtype, name="proj",
                kernel_init=layers.logical(_conv_init((k, k), self.features),
                                           (None, None, None, "embed")),
                bias_init=layers.logical(nn.initializers.zeros, ("embed",)))(x)
    x = layers.layer_norm("norm", self.norm_eps, self.dtype)(x)
    return layers.constrain(x, ("act_batch", None, None, "act_embed"))


class MixFFN(nn.Module):
  """fc1 -> depthwise 3x3 conv (bias) -> GELU -> fc2 on a (B, h, w, C) map."""

  hidden_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d, hid = x.shape[-1], self.hidden_dim
    y = _dense(hid, ("embed", "mlp"), "fc1", self.dtype)(x)
    y = cpu_ops.DepthwiseConv(3, dtype=self.dtype, name="dwconv",
                             kernel_init=layers.logical(_conv_init((3, 3), hid, hid),
                                                        (None, None, None, "mlp")),
                             bias_init=layers.logical(nn.initializers.zeros, ("mlp",)))(y)
    y = nn.gelu(y, approximate=False)
    y = layers.constrain(y, ("act_batch", None, None, "act_mlp"))
    return _dense(d, ("mlp", "embed"), "fc2", self.dtype)(y)


class MiTBlock(nn.Module):
  """x + DropPath(Attn(LN(x) queries, reduce(LN(x)) keys / values)), then
  x + DropPath(MixFFN(LN(x))), on a (B, h, w, C) map."""

  num_heads: int
  sr_ratio: int
  mlp_ratio: int = 4
  norm_eps: float = 1e-6
  embed_norm_eps: float = 1e-5
  drop_path: float = 0.0
  attention: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    b, h, w, d = x.shape
    y = layers.layer_norm("norm1", self.norm_eps, self.dtype)(x)
    kv = y
    if self.sr_ratio > 1:
      r = self.sr_ratio
      if h < r or w < r:  # torch's Conv2d refuses it too; XLA would attend to no keys
        raise ValueError(f"feature map {h}x{w} is smaller than the key/value reduction "
                         f"{r}x{r}: the input is too small for this MiT")
      kv = nn.Conv(d, (r, r), strides=(r, r), padding="VALID", dtype=self.dtype, name="sr",
                   kernel_init=layers.logical(_conv_init((r, r), d),
                                              (None, None, None, "embed")),
                   bias_init=layers.logical(nn.initializers.zeros, ("embed",)))(kv)
      kv = layers.layer_norm("sr_norm", self.embed_norm_eps, self.dtype)(kv)
    tokens = lambda t: t.reshape(b, -1, d)  # noqa: E731
    y = layers.Attention(self.num_heads, implementation=self.attention, dtype=self.dtype,
                         name="attn", kernel_init=layers.trunc_normal_02)(tokens(y), tokens(kv))
    x = x + layers.DropPath(self.drop_path)(y.reshape(b, h, w, d), deterministic)
    y = layers.layer_norm("norm2", self.norm_eps, self.dtype)(x)
    y = MixFFN(d * self.mlp_ratio, dtype=self.dtype, name="mlp")(y)
    x = x + layers.DropPath(self.drop_path)(y, deterministic)
    return layers.constrain(x, ("act_batch", None, None, "act_embed"))


class MiT(nn.Module):
  """Mix Transformer. Fields beyond the sizes (dims, depths):

  num_heads, sr_ratios, patch_sizes, strides: per stage; the release's values are the
    defaults. Patch-embedding padding is patch_size // 2.
  mlp_ratio: Mix-FFN hidden width / stage width (4 in every stage of the released weights;
    the paper's table says 8, 8, 4, 4).
  norm_eps: block and stage-closing LayerNorms (1e-6 release, 1e-5 transformers; see the
    module docstring). embed_norm_eps: patch-embedding and key / value reduction LayerNorms.
  drop_path: stochastic-depth rate of the last block; the rate grows linearly over all blocks
    of all stages, block i (counted across stages) gets drop_path * i / (total - 1).
  attention: how the efficient attention is computed (`layers.ATTENTION_IMPLEMENTATIONS`).
  """

  dims: Sequence[int]
  depths: Sequence[int]
  num_heads: Sequence[int] = (1, 2, 5, 8)
  sr_ratios: Sequence[int] = (8, 4, 2, 1)
  patch_sizes: Sequence[int] = (7, 3, 3, 3)
  strides: Sequence[int] = (4, 2, 2, 2)
  mlp_ratio: int = 4
  norm_eps: float = 1e-6
  embed_norm_eps: float = 1e-5
  drop_path: float = 0.1
  attention: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False):
    per_stage = (self.dims, self.depths, self.num_heads, self.sr_ratios, self.patch_sizes,
                 self.strides)
    if len({len(v) for v in per_stage}) != 1:
      raise ValueError("MiT per-stage fields (dims, depths, num_heads, sr_ratios, "
                       "patch_sizes, strides) must have equal lengths, got "
                       f"{[len(v) for v in per_stage]}")
    total = sum(self.depths)
    # The release: torch.linspace(0, drop_path, total); transformers: i / (total - 1).
    dpr = [float(r) for r in np.linspace(0.0, self.drop_path, total)]
    x, features, blocks, i = images, [], [], 0
    for s, (d, depth, heads, sr, k, stride) in enumerate(zip(*per_stage), start=1):
      x = OverlapPatchEmbed(d, k, stride, self.embed_norm_eps, dtype=self.dtype,
                            name=f"patch_embed_{s}")(x)
      for j in range(depth):
        x = MiTBlock(heads, sr, self.mlp_ratio, self.norm_eps, self.embed_norm_eps, dpr[i],
                     self.attention, dtype=self.dtype, name=f"block_{s}_{j}")(x, not train)
        blocks.append(x)
        i += 1
      x = layers.layer_norm(f"norm_{s}", self.norm_eps, self.dtype)(x)
      features.append(x)
    return features, {"blocks": blocks}


def Model(variant: str | None = None, **kwargs) -> MiT:  # noqa: N802 (big_vision factory name)
  """`Model(variant="B2", norm_eps=1e-5)`; explicit fields override the variant's sizes."""
  sizes = decode_variant(variant) if variant else {}
  return MiT(**{**sizes, **kwargs})

