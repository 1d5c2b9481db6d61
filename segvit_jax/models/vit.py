"""Plain Vision Transformer backbone, AugReg flavour (Dosovitskiy et al. 2021; Steiner et al.
2022), as SegViT uses it (spec segvit.md, "Backbone").

`ViT(variant="B/16")` decodes size names like big_vision. The model returns `(tokens, aux)`:
`tokens` (B, h, w, D) after the optional final norm and `aux["blocks"]`, the output of every
block (B, h, w, D), so a decoder taps intermediate layers without plumbing.

Any input H x W divisible by the patch size works, non-square included: the learned position
embedding (stored on `posemb_grid`) is resized bicubically to the input grid on the fly.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from segvit_jax.models import layers

# name -> (width, depth, mlp_dim, num_heads)
_SIZES = {
    "mu": (32, 1, 128, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
}


def decode_variant(variant: str) -> dict[str, Any]:
  """"B/16" -> dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16)."""
  try:
    size, patch = variant.split("/")
    width, depth, mlp_dim, num_heads = _SIZES[size]
    patch_size = int(patch)
  except (ValueError, KeyError):
    raise ValueError(
        f"unknown ViT variant {variant!r}: expected SIZE/PATCH with SIZE in "
        f"{sorted(_SIZES)} and an integer patch, e.g. 'B/16'") from None
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads,
              patch_size=patch_size)


class EncoderBlock(nn.Module):
  """Pre-norm transformer block: x + DropPath(MHA(LN(x))), then x + DropPath(MLP(LN(x)))."""

  num_heads: int
  mlp_dim: int
  drop_path: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    norm = functools.partial(nn.LayerNorm, epsilon=1e-6, dtype=self.dtype,
                             scale_init=layers.logical(nn.initializers.ones, ("embed",)),
                             bias_init=layers.logical(nn.initializers.zeros, ("embed",)))
    y = norm(name="norm1")(x)
    y = layers.Attention(self.num_heads, dtype=self.dtype, name="attn")(y)
    x = x + layers.DropPath(self.drop_path)(y, deterministic)
    y = norm(name="norm2")(x)
    y = layers.Mlp(self.mlp_dim, dtype=self.dtype, name="mlp")(y)
    x = x + layers.DropPath(self.drop_path)(y, deterministic)
    return layers.constrain(x, ("act_batch", "act_len", "act_embed"))


class ViT(nn.Module):
  """Plain ViT. Fields:

  cls_token: the model owns a class token (AugReg does; its position slot comes first).
  cls_in_blocks: whether the class token is processed by the blocks. SegViT drops it before
    the first block (the weights exist but do not affect the output); plain-backbone use
    (feature extraction, parity with timm / transformers) keeps it.
  posemb_grid: the grid the position embedding is stored on.
  final_norm: LayerNorm after the last block (AugReg classifiers have one; SegViT does not).
  """

  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int = 16
  posemb_grid: tuple[int, int] = (14, 14)
  cls_token: bool = True
  cls_in_blocks: bool = True
  final_norm: bool = True
  drop_path: float = 0.0
  remat: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False):
    b, h, w, _ = images.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f"input {h}x{w} is not divisible by the patch size {p}")
    gh, gw = h // p, w // p

    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                name="embedding",
                kernel_init=layers.logical(nn.initializers.lecun_normal(),
                                           (None, None, None, "embed")),
                bias_init=layers.logical(nn.initializers.zeros, ("embed",)))(images)
    x = x.reshape(b, gh * gw, self.width)

    n_pos = self.posemb_grid[0] * self.posemb_grid[1] + int(self.cls_token)
    posemb = self.param("pos_embedding",
                        layers.logical(nn.initializers.normal(0.02), (None, None, "embed")),
                        (1, n_pos, self.width))
    patch_pos = posemb[:, int(self.cls_token):].reshape(1, *self.posemb_grid, self.width)
    patch_pos = layers.resize_posemb(patch_pos, (gh, gw)).reshape(1, gh * gw, self.width)
    x = x + patch_pos.astype(x.dtype)

    n_prefix = 0
    if self.cls_token:
      cls = self.param("cls", layers.logical(nn.initializers.zeros, (None, None, "embed")),
                       (1, 1, self.width))
      if self.cls_in_blocks:
        cls = (cls + posemb[:, :1]).astype(x.dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)), x], axis=1)
        n_prefix = 1
    x = layers.constrain(x, ("act_batch", "act_len", "act_embed"))

    block_cls = nn.remat(EncoderBlock, static_argnums=(2,)) if self.remat else EncoderBlock
    dpr = [self.drop_path * i / max(self.depth - 1, 1) for i in range(self.depth)]
    blocks = []
    for i in range(self.depth):
      x = block_cls(self.num_heads, self.mlp_dim, dpr[i], dtype=self.dtype,
                    name=f"encoderblock_{i}")(x, not train)
      blocks.append(x[:, n_prefix:].reshape(b, gh, gw, self.width))

    if self.final_norm:
      x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="encoder_norm",
                       scale_init=layers.logical(nn.initializers.ones, ("embed",)),
                       bias_init=layers.logical(nn.initializers.zeros, ("embed",)))(x)
    aux = {"blocks": blocks, "grid": (gh, gw)}
    if n_prefix:
      aux["cls"] = x[:, 0]
    return x[:, n_prefix:].reshape(b, gh, gw, self.width), aux


def Model(variant: str | None = None, **kwargs) -> ViT:  # noqa: N802 (big_vision factory name)
  """`Model(variant="B/16", drop_path=0.1)`; explicit keyword sizes override the variant's."""
  sizes = decode_variant(variant) if variant else {}
  return ViT(**{**sizes, **kwargs})
