"""Plain Vision Transformer backbones: AugReg (Dosovitskiy et al. 2021; Steiner et al. 2022),
as SegViT uses it (spec segvit.md, "Backbone"), and DINOv2 (Oquab et al. 2023; registers:
Darcet et al. 2024), as EoMT uses it (spec eomt.md, "Backbone"). One implementation.

`Model(variant=...)` decodes big_vision-style names, with an optional family prefix:
  "B/16", "augreg-B/16"    AugReg: cls token, final norm, GELU MLP.
  "dinov2-L/14"            DINOv2: + LayerScale, 37x37 stored position grid (518 px); size g
                           uses a SwiGLU FFN (hidden 4096, DINOv2's 2/3 rule rounded to 8).
  "dinov2-L/14-reg4"       DINOv2 with 4 register tokens.
Explicit keyword fields override what the variant implies.

The model returns `(tokens, aux)`: `tokens` (B, h, w, D) patch tokens after the optional final
norm and `aux["blocks"]`, the patch tokens after every block (B, h, w, D), so a decoder taps
intermediate layers without plumbing; `aux["cls"]` / `aux["registers"]` when present.
Token order inside the blocks: [cls | registers | patches]; registers carry no position
embedding.

Any input H x W divisible by the patch size works, non-square included: the learned position
embedding (stored on `posemb_grid`) is resized to the input grid on the fly with
`posemb_resize` (one of `layers.RESIZE_METHODS`; each converter records the method of the
implementation it came from).
"""

from __future__ import annotations

import functools
import re
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
  "g": (1536, 40, 6144, 24),
}

# Family defaults (spec eomt.md / segvit.md); explicit fields override them.
_FAMILIES = {
    "augreg": dict(),
    "dinov2": dict(layerscale=1e-5, posemb_grid=(37, 37), posemb_resize="bicubic_dinov2"),
}


def swiglu_hidden(mlp_dim: int) -> int:
  """DINOv2's SwiGLU hidden width for an MLP width: 2/3 of it, rounded up to a multiple of 8."""
  return (int(mlp_dim * 2 / 3) + 7) // 8 * 8


def decode_variant(variant: str) -> dict[str, Any]:
  """"B/16" -> dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16);
  "dinov2-g/14-reg4" -> DINOv2 giant fields (LayerScale, SwiGLU, 4 registers, ...)."""
  try:
    m = re.fullmatch(r"(?:(augreg|dinov2)-)?(\w+)/(\d+)(?:-reg(\d+))?", variant)
    family, size, patch, registers = m.groups()
    width, depth, mlp_dim, num_heads = _SIZES[size]
  except (AttributeError, KeyError):
    raise ValueError(
        f"unknown ViT variant {variant!r}: expected [augreg-|dinov2-]SIZE/PATCH[-regN] with "
        f"SIZE in {sorted(_SIZES)}, e.g. 'B/16', 'dinov2-L/14-reg4'") from None
  out = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads,
             patch_size=int(patch), **_FAMILIES[family or "augreg"])
  if family == "dinov2":
    if size == "g":
      out.update(ffn="swiglu", mlp_dim=swiglu_hidden(mlp_dim))
    if registers:  # register models interpolate with antialias and no offset
      out.update(num_registers=int(registers), posemb_resize="bicubic_antialias")
  elif registers:
    raise ValueError(f"ViT variant {variant!r}: registers exist only for 'dinov2-' variants")
  return out


class SwiGLU(nn.Module):
  """DINOv2-g FFN: w3(silu(w1 x) * w2 x) (the release packs w1 and w2 as one `w12`)."""

  hidden_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = functools.partial(nn.Dense, dtype=self.dtype,
                              kernel_init=layers.logical(nn.initializers.xavier_uniform(),
                                                         ("embed", "mlp")),
                              bias_init=layers.logical(nn.initializers.zeros, ("mlp",)))
    h = nn.silu(dense(self.hidden_dim, name="w1")(x)) * dense(self.hidden_dim, name="w2")(x)
    h = layers.constrain(h, ("act_batch", "act_len", "act_mlp"))
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="w3",
                    kernel_init=layers.logical(nn.initializers.xavier_uniform(),
                                               ("mlp", "embed")),
                    bias_init=layers.logical(nn.initializers.zeros, ("embed",)))(h)


class EncoderBlock(nn.Module):
  """Pre-norm transformer block: x + DropPath(ls1 * MHA(LN(x))), then
  x + DropPath(ls2 * FFN(LN(x))); LayerScale (ls1, ls2) only when `layerscale` is set (its
  initial value)."""

  num_heads: int
  mlp_dim: int
  ffn: str = "mlp"
  layerscale: float | None = None
  norm_eps: float = 1e-6
  drop_path: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    norm = functools.partial(nn.LayerNorm, epsilon=self.norm_eps, dtype=self.dtype,
                             scale_init=layers.logical(nn.initializers.ones, ("embed",)),
                             bias_init=layers.logical(nn.initializers.zeros, ("embed",)))

    def scale(y, name):
      if self.layerscale is None:
        return y
      gamma = self.param(name, layers.logical(nn.initializers.constant(self.layerscale),
                                              ("embed",)), (y.shape[-1],))
      return y * gamma.astype(y.dtype)

    y = norm(name="norm1")(x)
    y = layers.Attention(self.num_heads, dtype=self.dtype, name="attn")(y)
    x = x + layers.DropPath(self.drop_path)(scale(y, "ls1"), deterministic)
    y = norm(name="norm2")(x)
    if self.ffn == "swiglu":
      y = SwiGLU(self.mlp_dim, dtype=self.dtype, name="mlp")(y)
    elif self.ffn == "mlp":
      y = layers.Mlp(self.mlp_dim, dtype=self.dtype, name="mlp")(y)
    else:
      raise ValueError(f"unknown ffn {self.ffn!r}; expected 'mlp' or 'swiglu'")
    x = x + layers.DropPath(self.drop_path)(scale(y, "ls2"), deterministic)
    return layers.constrain(x, ("act_batch", "act_len", "act_embed"))


class ViT(nn.Module):
  """Plain ViT. Fields beyond the sizes:

  cls_token: the model owns a class token (its position slot comes first in `pos_embedding`).
  cls_in_blocks: whether the class token is processed by the blocks. SegViT drops it before
    the first block (the weights exist but do not affect the output); plain-backbone use
    (feature extraction, parity with timm / transformers) keeps it.
  num_registers: DINOv2 register tokens (`registers`, no position embedding).
  posemb_grid: the grid the position embedding is stored on.
  posemb_resize: how it is resized to other grids (`layers.RESIZE_METHODS`).
  layerscale: LayerScale initial value (None: no LayerScale). ffn: "mlp" or "swiglu".
  final_norm: LayerNorm after the last block (AugReg / DINOv2 have one; SegViT does not).
  """

  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int = 16
  posemb_grid: tuple[int, int] = (14, 14)
  posemb_resize: str = "bicubic"
  cls_token: bool = True
  cls_in_blocks: bool = True
  num_registers: int = 0
  layerscale: float | None = None
  ffn: str = "mlp"
  norm_eps: float = 1e-6
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
    d = self.width

    x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                name="embedding",
                kernel_init=layers.logical(nn.initializers.lecun_normal(),
                                           (None, None, None, "embed")),
                bias_init=layers.logical(nn.initializers.zeros, ("embed",)))(images)
    x = x.reshape(b, gh * gw, d)

    grid = tuple(self.posemb_grid)
    n_pos = grid[0] * grid[1] + int(self.cls_token)
    posemb = self.param("pos_embedding",
                        layers.logical(nn.initializers.normal(0.02), (None, None, "embed")),
                        (1, n_pos, d))
    patch_pos = posemb[:, int(self.cls_token):].reshape(1, *grid, d)
    patch_pos = layers.resize_posemb(patch_pos, (gh, gw), self.posemb_resize)
    x = x + patch_pos.reshape(1, gh * gw, d).astype(x.dtype)

    prefix = []
    if self.cls_token:
      cls = self.param("cls", layers.logical(nn.initializers.zeros, (None, None, "embed")),
                       (1, 1, d))
      if self.cls_in_blocks:
        prefix.append(cls + posemb[:, :1])
    if self.num_registers:
      prefix.append(self.param(
          "registers", layers.logical(nn.initializers.zeros, (None, None, "embed")),
          (1, self.num_registers, d)))
    n_prefix = sum(t.shape[1] for t in prefix)
    if prefix:
      prefix = jnp.concatenate(prefix, axis=1).astype(x.dtype)
      x = jnp.concatenate([jnp.broadcast_to(prefix, (b, n_prefix, d)), x], axis=1)
    x = layers.constrain(x, ("act_batch", "act_len", "act_embed"))

    block_cls = nn.remat(EncoderBlock, static_argnums=(2,)) if self.remat else EncoderBlock
    dpr = [self.drop_path * i / max(self.depth - 1, 1) for i in range(self.depth)]
    blocks = []
    for i in range(self.depth):
      x = block_cls(self.num_heads, self.mlp_dim, self.ffn, self.layerscale, self.norm_eps,
                    dpr[i], dtype=self.dtype, name=f"encoderblock_{i}")(x, not train)
      blocks.append(x[:, n_prefix:].reshape(b, gh, gw, d))

    if self.final_norm:
      x = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name="encoder_norm",
                       scale_init=layers.logical(nn.initializers.ones, ("embed",)),
                       bias_init=layers.logical(nn.initializers.zeros, ("embed",)))(x)
    aux = {"blocks": blocks, "grid": (gh, gw)}
    has_cls = self.cls_token and self.cls_in_blocks
    if has_cls:
      aux["cls"] = x[:, 0]
    if self.num_registers:
      aux["registers"] = x[:, int(has_cls):n_prefix]
    return x[:, n_prefix:].reshape(b, gh, gw, d), aux


def Model(variant: str | None = None, **kwargs) -> ViT:  # noqa: N802 (big_vision factory name)
  """`Model(variant="B/16", drop_path=0.1)`; explicit keyword sizes override the variant's."""
  sizes = decode_variant(variant) if variant else {}
  return ViT(**{**sizes, **kwargs})
