"""Plain Vision Transformer backbones: AugReg (Dosovitskiy et al., ICLR 2021, Sec. 3.1, Eq.
(1)-(3); Steiner et al., TMLR 2022), as SegViT uses it (SegViT Sec. 3.1 and 4.2, "Transformer
backbone"), and DINOv2 (Oquab et al. 2023, Table 17; registers: Darcet et al., ICLR 2024, Sec.
2.2), as EoMT uses it (EoMT Sec. 4.1 and App. A.1), and DINOv3 (Simeoni et al. 2025; the
facebookresearch/dinov3 release's models/vision_transformer.py and hub/backbones.py). One
implementation.

`Model(variant=...)` decodes big_vision-style names, with an optional family prefix:
  "B/16", "augreg-B/16"    AugReg: cls token, final norm, GELU MLP.
  "dinov2-L/14"            DINOv2: + LayerScale, 37x37 stored position grid (518 px); size g
                           uses a SwiGLU FFN (hidden 4096, DINOv2's 2/3 rule rounded to 8).
  "dinov2-L/14-reg4"       DINOv2 with 4 register tokens.
  "dinov3-L/16"            DINOv3 (sizes S, S+, B, L, L+, H+, 7B): rotary position embeddings
                           on the patch grid instead of a learned table (`rope_theta` 100;
                           training-time coordinate rescale 2.0 as the release and
                           transformers), 4 registers, LayerScale, no key bias, LayerNorm eps
                           1e-5; the "+" sizes and 7B use a SwiGLU FFN, 7B has no query /
                           value biases.
Explicit keyword fields override what the variant implies.

The model returns `(tokens, aux)`: `tokens` (B, h, w, D) patch tokens after the optional final
norm and `aux["blocks"]`, the patch tokens after every block (B, h, w, D), so a decoder taps
intermediate layers without plumbing; `aux["cls"]` / `aux["registers"]` when present.
Token order inside the blocks: [cls | registers | patches]; registers carry no position
embedding. The pieces of the forward pass that own parameters (`embed`, `block_factory`,
`final_layer_norm`; `block_schedule` for drop path; `run_blocks` / `run_block`) are methods,
so that EoMT's encoder (`eomt.EoMTEncoder`, a subclass that inserts queries and masks
attention) and SegViT-Shrunk's (`shrunk.ShrunkViT`) run the same parameters, under the same
names, their own way.

Any input H x W divisible by the patch size works, non-square included: the learned position
embedding (stored on `posemb_grid`) is resized to the input grid on the fly with
`posemb_resize` (one of `layers.RESIZE_METHODS`; each converter records the method of the
implementation it came from). With `rope_theta` there is no position table: the patch tokens'
queries and keys are rotated by their normalised grid coordinates (`layers.rope_sin_cos`),
computed for each input grid, so the cls token and the registers carry no position.

SegViT-Shrunk's query down-sampling is a subclass (`shrunk.ShrunkViT`): it runs one block on
fewer queries than keys / values (`EncoderBlock`'s `kv` input) through the `run_block` hook.

Memory options: `remat` recomputes each block's activations in the backward pass (what is kept
is `remat_policy`, a name of `REMAT_POLICIES`); `scan_layers` runs the blocks as one `nn.scan`
(one compiled block instead of `depth` copies), their parameters stacked on a leading depth axis
(logical name "layers") under one name, `encoderblock`, instead of `encoderblock_{i}`. Both
give the same outputs, drop-path masks included. Checkpoints of either layout load into a
model of either (`stack_blocks` / `unstack_blocks`); bundles store the unstacked layout.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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

# What `remat` keeps from the forward pass (the rest is recomputed in the backward pass).
REMAT_POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}

# DINOv3 sizes of the release's hub/backbones.py: name -> (width, depth, num_heads, ffn_ratio,
# SwiGLU alignment or None for the GELU MLP). The SwiGLU hidden width is swiglu_hidden(ratio * D).
_DINOV3_SIZES = {
    "S": (384, 12, 6, 4, None),
    "S+": (384, 12, 6, 6, 8),
    "B": (768, 12, 12, 4, None),
    "L": (1024, 24, 16, 4, None),
    "L+": (1024, 24, 16, 6, 8),
    "H+": (1280, 32, 20, 6, 8),
    "7B": (4096, 40, 32, 3, 64),
}

# Family defaults (DINOv2: LayerScale, 518 px / 37 x 37 stored grid, its release's position-
# embedding interpolation; DINOv3: RoPE, registers, LayerScale, masked key bias and the eps of
# its "layernormbf16" norms, as every released DINOv3 ViT); explicit fields override them.
_FAMILIES = {
    "augreg": dict(),
    "dinov2": dict(layerscale=1e-5, posemb_grid=(37, 37), posemb_resize="bicubic_dinov2"),
    "dinov3": dict(layerscale=1e-5, num_registers=4, norm_eps=1e-5, rope_theta=100.0,
                   rope_rescale=2.0, key_bias=False),
}


def swiglu_hidden(mlp_dim: int, align: int = 8) -> int:
  """DINOv2 / DINOv3's SwiGLU hidden width for an MLP width: 2/3 of it, rounded up to a
  multiple of `align` (8; DINOv3-7B's "swiglu64": 64)."""
  d = int(mlp_dim * 2 / 3)
  return d + (-d % align)


def decode_variant(variant: str) -> dict[str, Any]:
  """"B/16" -> dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16);
  "dinov2-g/14-reg4" -> DINOv2 giant fields (LayerScale, SwiGLU, 4 registers, ...);
  "dinov3-H+/16" -> DINOv3 ViT-H+ fields (RoPE, SwiGLU, 4 registers, ...)."""
  m = re.fullmatch(r"(?:(augreg|dinov2|dinov3)-)?([\w+]+)/(\d+)(?:-reg(\d+))?", variant)
  family, size, patch, registers = m.groups() if m else (None, None, None, None)
  sizes = _DINOV3_SIZES if family == "dinov3" else _SIZES
  if size not in sizes:
    raise ValueError(
        f"unknown ViT variant {variant!r}: expected [augreg-|dinov2-]SIZE/PATCH[-regN] with "
        f"SIZE in {sorted(_SIZES)}, e.g. 'B/16', 'dinov2-L/14-reg4', or dinov3-SIZE/PATCH "
        f"with SIZE in {list(_DINOV3_SIZES)}, e.g. 'dinov3-L/16'")
  out = dict(patch_size=int(patch), **_FAMILIES[family or "augreg"])
  if family == "dinov3":
    width, depth, num_heads, ratio, align = sizes[size]
    out.update(width=width, depth=depth, num_heads=num_heads, mlp_dim=ratio * width)
    if align is not None:
      out.update(ffn="swiglu", mlp_dim=swiglu_hidden(ratio * width, align))
    if size == "7B":  # the release's vit_7b: qkv_bias=False
      out.update(qkv_bias=False)
    if registers:
      out.update(num_registers=int(registers))
    return out
  width, depth, mlp_dim, num_heads = sizes[size]
  out.update(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads)
  if family == "dinov2":
    if size == "g":
      out.update(ffn="swiglu", mlp_dim=swiglu_hidden(mlp_dim))
    if registers:  # register models interpolate with antialias and no offset
      out.update(num_registers=int(registers), posemb_resize="bicubic_antialias")
  elif registers:
    raise ValueError(f"ViT variant {variant!r}: registers exist only for 'dinov2-' / 'dinov3-' "
                     "variants")
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
  initial value).

  With `kv`, the attention takes its keys / values from `kv` (through the same first norm)
  and its queries and the residual from `x`: x + MHA(LN1(x), LN1(kv)), then the FFN as usual;
  the output has the length of `x` (SegViT-Shrunk's query down-sampling passes the
  down-sampled tokens as `x` and all tokens as `kv`).

  The drop-path rate is a call argument, a float or a traced scalar (the ViT scans over the
  per-block rates); `rng` is this block's drop-path key (None: the "dropout" stream).
  `mask`: optional boolean self-attention mask, True = may attend, broadcastable to
  (B, heads, N, N) (EoMT's masked attention; see `layers.Attention`). `rope`: optional
  (sin, cos) rotary position embeddings of the last tokens (the patches; DINOv3).
  `attention`: the attention implementation (`layers.ATTENTION_IMPLEMENTATIONS`)."""

  num_heads: int
  mlp_dim: int
  ffn: str = "mlp"
  layerscale: float | None = None
  norm_eps: float = 1e-6
  qkv_bias: bool = True
  key_bias: bool = True
  attention: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True,
               drop_path: float | jax.Array = 0.0, rng: jax.Array | None = None,
               kv: jax.Array | None = None, mask: jax.Array | None = None,
               rope: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    def scale(y, name):
      if self.layerscale is None:
        return y
      gamma = self.param(name, layers.logical(nn.initializers.constant(self.layerscale),
                                              ("embed",)), (y.shape[-1],))
      return y * gamma.astype(y.dtype)

    rngs = (None, None) if rng is None else tuple(jax.random.split(rng))
    norm1 = layers.layer_norm("norm1", self.norm_eps, self.dtype)
    y = layers.Attention(self.num_heads, qkv_bias=self.qkv_bias, key_bias=self.key_bias,
                         implementation=self.attention, dtype=self.dtype, name="attn")(
        norm1(x), None if kv is None else norm1(kv), mask=mask, rope=rope)
    x = x + layers.DropPath(drop_path)(scale(y, "ls1"), deterministic, rngs[0])
    y = layers.layer_norm("norm2", self.norm_eps, self.dtype)(x)
    if self.ffn == "swiglu":
      y = SwiGLU(self.mlp_dim, dtype=self.dtype, name="mlp")(y)
    elif self.ffn == "mlp":
      y = layers.Mlp(self.mlp_dim, dtype=self.dtype, name="mlp")(y)
    else:
      raise ValueError(f"unknown ffn {self.ffn!r}; expected 'mlp' or 'swiglu'")
    x = x + layers.DropPath(drop_path)(scale(y, "ls2"), deterministic, rngs[1])
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
  rope_theta: rotary position embeddings of this base period on the patch tokens instead of
    the learned table (None: the table; DINOv3: 100).
  rope_shift, rope_jitter, rope_rescale: DINOv3's training-time augmentations of the RoPE
    coordinates (`layers.rope_augment`; None: off); never applied with train=False.
  qkv_bias, key_bias: biases of the query / key / value projections, and of the key alone.
  layerscale: LayerScale initial value (None: no LayerScale). ffn: "mlp" or "swiglu".
  final_norm: LayerNorm after the last block (AugReg / DINOv2 have one; SegViT does not).
  drop_path: stochastic-depth rate of the last block; block i gets
    drop_path * i / (depth - 1). Each block's masks come from its own key, split from one
    "dropout" key, so the scanned and the unrolled stacks drop the same examples.
  remat: recompute block activations in the backward pass, keeping what `remat_policy` (a
    name of REMAT_POLICIES) saves.
  scan_layers: run the blocks under `nn.scan`, parameters stacked (leading depth axis,
    logical name "layers") under `encoderblock` (see `stack_blocks`).
  attention: how the blocks' attention is computed (`layers.ATTENTION_IMPLEMENTATIONS`; the
    model config's `attention`).
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
  rope_theta: float | None = None
  rope_shift: float | None = None
  rope_jitter: float | None = None
  rope_rescale: float | None = None
  qkv_bias: bool = True
  key_bias: bool = True
  layerscale: float | None = None
  ffn: str = "mlp"
  norm_eps: float = 1e-6
  final_norm: bool = True
  drop_path: float = 0.0
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  scan_layers: bool = False
  attention: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False):
    x, grid, n_prefix = self.embed(images)
    x, blocks, (gh, gw) = self.run_blocks(x, grid, n_prefix, train)
    if self.final_norm:
      x = self.final_layer_norm()(x)
    aux = {"blocks": blocks, "grid": (gh, gw)}
    has_cls = self.cls_token and self.cls_in_blocks
    if has_cls:
      aux["cls"] = x[:, 0]
    if self.num_registers:
      aux["registers"] = x[:, int(has_cls):n_prefix]
    return x[:, n_prefix:].reshape(x.shape[0], gh, gw, self.width), aux

  # The pieces below create this module's parameters; they are called from a compact
  # `__call__` (this one, or a subclass's that runs the blocks differently, e.g.
  # `eomt.EoMTEncoder`), so every user shares one parameter layout.

  def embed(self, images: jax.Array) -> tuple[jax.Array, tuple[int, int], int]:
    """Images (B, H, W, 3) -> (tokens (B, n_prefix + gh * gw, D) = [cls | registers | patches]
    with learned position embeddings added (none with RoPE: `rotary_embedding`), the patch grid
    (gh, gw), n_prefix)."""
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

    if self.rope_theta is None:
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
        prefix.append(cls if self.rope_theta is not None else cls + posemb[:, :1])
    if self.num_registers:
      prefix.append(self.param(
          "registers", layers.logical(nn.initializers.zeros, (None, None, "embed")),
          (1, self.num_registers, d)))
    n_prefix = sum(t.shape[1] for t in prefix)
    if prefix:
      prefix = jnp.concatenate(prefix, axis=1).astype(x.dtype)
      x = jnp.concatenate([jnp.broadcast_to(prefix, (b, n_prefix, d)), x], axis=1)
    return layers.constrain(x, ("act_batch", "act_len", "act_embed")), (gh, gw), n_prefix

  def rotary_embedding(self, grid: tuple[int, int], train: bool
                       ) -> tuple[jax.Array, jax.Array] | None:
    """(sin, cos), each (gh * gw, head_dim) float32, of the patch grid for the blocks'
    attention; None without RoPE. In training, with coordinate augmentations set, one draw
    from the "dropout" stream for the whole batch and every block (as transformers)."""
    if self.rope_theta is None:
      return None
    coords = jnp.asarray(layers.rope_coords(grid))
    augment = dict(shift=self.rope_shift, jitter=self.rope_jitter, rescale=self.rope_rescale)
    if train and any(v is not None for v in augment.values()):
      coords = layers.rope_augment(coords, self.make_rng("dropout"), **augment)
    return layers.rope_sin_cos(coords, self.width // self.num_heads, self.rope_theta)

  def block_schedule(self, train: bool) -> tuple[bool, np.ndarray, jax.Array | None]:
    """(whether drop path is on, the per-block rates (depth,) float32, one drop-path key per
    block or None)."""
    remat_policy(self.remat_policy)  # unknown names fail even without remat
    # float32 rates, as the scan carries them.
    dpr = np.float32(self.drop_path) * np.arange(self.depth, dtype=np.float32) / np.float32(
        max(self.depth - 1, 1))
    drop = train and self.drop_path > 0.0
    # One key per block, drawn here rather than by make_rng inside the blocks (whose streams
    # depend on the module path, which scanning changes): same masks in both layouts.
    keys = jax.random.split(self.make_rng("dropout"), self.depth) if drop else None
    return drop, dpr, keys

  def run_blocks(self, x: jax.Array, grid: tuple[int, int], n_prefix: int, train: bool
                 ) -> tuple[jax.Array, list[jax.Array], tuple[int, int]]:
    """Every block on the tokens (B, n_prefix + gh * gw, D): (the last block's tokens, each
    block's patch tokens on its grid (B, h, w, D), the last grid). Unrolled, block i is
    `run_block(i, ...)`; with `scan_layers`, one scanned block."""
    b, d = x.shape[0], self.width
    drop, dpr, keys = self.block_schedule(train)
    rope = self.rotary_embedding(grid, train)
    make_block = self.block_factory()
    if self.scan_layers:
      def body(block, x, xs):
        rate, key = xs
        x = block(x, not drop, rate, key, rope=rope)
        return x, x[:, n_prefix:]

      x, patches = nn.scan(
          body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
          length=self.depth, metadata_params={nn.PARTITION_NAME: "layers"},
      )(make_block(name="encoderblock"), x, (jnp.asarray(dpr), keys))
      # (depth, B, N, D) -> one (B, gh, gw, D) per block
      return x, [patches[i].reshape(b, *grid, d) for i in range(self.depth)], grid
    blocks = []
    for i in range(self.depth):
      block = make_block(name=f"encoderblock_{i}")
      if rope is not None:
        block = functools.partial(block, rope=rope)
      x, grid = self.run_block(i, block, x, grid, n_prefix,
                               not drop, float(dpr[i]), None if keys is None else keys[i])
      blocks.append(x[:, n_prefix:].reshape(b, *grid, d))
    return x, blocks, grid

  def run_block(self, i: int, block: nn.Module, x: jax.Array, grid: tuple[int, int],
                n_prefix: int, deterministic: bool, drop_path: float, rng: jax.Array | None
                ) -> tuple[jax.Array, tuple[int, int]]:
    """Block `i` of the unrolled stack on the tokens: (its output tokens, their grid)."""
    del i, n_prefix  # (a subclass's block may need them)
    return block(x, deterministic, drop_path, rng), grid

  def block_factory(self) -> Callable[..., nn.Module]:
    """`make_block(name=...)`: an EncoderBlock of this ViT (rematerialised with `remat`)."""
    block_cls = EncoderBlock
    if self.remat:  # static: `deterministic`, and the (Python float) rate when unrolled
      block_cls = nn.remat(EncoderBlock, static_argnums=(2,) if self.scan_layers else (2, 3),
                           policy=remat_policy(self.remat_policy),
                           prevent_cse=not self.scan_layers)
    return functools.partial(block_cls, self.num_heads, self.mlp_dim, self.ffn,
                             self.layerscale, self.norm_eps, qkv_bias=self.qkv_bias,
                             key_bias=self.key_bias, attention=self.attention, dtype=self.dtype)

  def final_layer_norm(self) -> nn.LayerNorm:
    """The LayerNorm after the last block, `encoder_norm` (create it once per call)."""
    return layers.layer_norm("encoder_norm", self.norm_eps, self.dtype)


def Model(variant: str | None = None, **kwargs) -> ViT:  # noqa: N802 (big_vision factory name)
  """`Model(variant="B/16", drop_path=0.1)`; explicit keyword sizes override the variant's."""
  sizes = decode_variant(variant) if variant else {}
  return ViT(**{**sizes, **kwargs})


def patch_size(backbone: Mapping[str, Any]) -> int:
  """The patch size a backbone config implies (its `patch_size`, else its variant's)."""
  return int(backbone.get("patch_size") or decode_variant(backbone["variant"])["patch_size"])


def from_config(model_cfg: Mapping[str, Any], dtype: Any) -> ViT:
  """A backbone alone (`model.name="vit"`: converted pretrained weights) from its config."""
  backbone = dict(model_cfg["backbone"])
  backbone["posemb_grid"] = tuple(backbone["posemb_grid"])
  return Model(**backbone, attention=layers.attention_setting(model_cfg), dtype=dtype)


def backbone_from_config(model_cfg: Mapping[str, Any], dtype: Any) -> ViT:
  """The backbone of a backbone config: the model itself."""
  return from_config(model_cfg, dtype)


def input_divisor(model_cfg: Mapping[str, Any]) -> int:
  """Input sides must be multiples of the patch size."""
  return patch_size(model_cfg["backbone"])


def remat_policy(name: str) -> Callable[..., bool]:
  """The `jax.checkpoint_policies` entry a REMAT_POLICIES name stands for."""
  if name not in REMAT_POLICIES:
    raise ValueError(f"unknown remat_policy {name!r}; known: {', '.join(REMAT_POLICIES)}")
  return REMAT_POLICIES[name]


# Block parameter layouts. Unstacked (canonical; bundles and converters): `encoderblock_{i}/...`
# per block. Stacked (scan_layers=True): `encoderblock/...`, each leaf with a leading depth axis.
STACKED_BLOCKS = "encoderblock"
_BLOCK = re.compile(r"encoderblock_(\d+)")


def blocks_layout(tree: Any) -> str | None:
  """"stacked", "unstacked" or None (no ViT blocks) for any pytree whose dict keys name the
  blocks: parameters, optimizer states mirroring them, orbax metadata trees."""
  found = set()
  for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
    for k in path:
      name = getattr(k, "key", None)
      if name == STACKED_BLOCKS:
        found.add("stacked")
      elif isinstance(name, str) and _BLOCK.fullmatch(name):
        found.add("unstacked")
  if len(found) > 1:
    raise ValueError("the tree holds both stacked (encoderblock/) and unstacked "
                     "(encoderblock_{i}/) ViT blocks")
  return found.pop() if found else None


def _stack_leaves(leaves: Sequence[Any]) -> Any:
  if any(isinstance(x, jax.Array) for x in leaves):
    return jnp.stack(leaves)
  return np.stack([np.asarray(x) for x in leaves])


def _take_leaf(x: Any, i: int) -> Any:
  return x[i]


def _rebuild(node: Mapping, items: list[tuple[Any, Any]]) -> Mapping:
  return type(node)(items) if not isinstance(node, dict) else dict(items)


def stack_blocks(tree: Any, stack: Callable[[Sequence[Any]], Any] = _stack_leaves) -> Any:
  """`encoderblock_{i}/X` (i = 0..depth-1) -> `encoderblock/X` with a leading depth axis, in
  every dict of `tree` that holds blocks (params, Adam's mu / nu, ...); the rest unchanged.
  `stack` turns the per-block leaves into one (default: np.stack, jnp.stack for jax arrays)."""
  def is_blocks(x):
    return isinstance(x, Mapping) and any(_BLOCK.fullmatch(str(k)) for k in x)

  def convert(node):
    if not is_blocks(node):
      return node
    ids = sorted(int(_BLOCK.fullmatch(str(k))[1]) for k in node if _BLOCK.fullmatch(str(k)))
    if ids != list(range(len(ids))) or STACKED_BLOCKS in node:
      raise ValueError(f"cannot stack blocks {ids} (expected 0..{len(ids) - 1}, and no "
                       f"{STACKED_BLOCKS!r} beside them)")
    stacked = jax.tree.map(lambda *xs: stack(xs), *[node[f"encoderblock_{i}"] for i in ids])
    items = []
    for k, v in node.items():
      if k == "encoderblock_0":
        items.append((STACKED_BLOCKS, stacked))
      elif not _BLOCK.fullmatch(str(k)):
        items.append((k, stack_blocks(v, stack)))
    return _rebuild(node, items)

  return jax.tree.map(convert, tree, is_leaf=is_blocks)


def unstack_blocks(tree: Any, take: Callable[[Any, int], Any] = _take_leaf) -> Any:
  """The inverse of `stack_blocks`: `encoderblock/X` (depth, ...) -> `encoderblock_{i}/X`.
  `take(leaf, i)` is block i's slice (default: leaf[i])."""
  def is_blocks(x):
    return isinstance(x, Mapping) and STACKED_BLOCKS in x

  def convert(node):
    if not is_blocks(node):
      return node
    sub = node[STACKED_BLOCKS]
    depths = {x.shape[0] for x in jax.tree.leaves(sub)}
    if len(depths) != 1:
      raise ValueError(f"stacked blocks with leading axes {sorted(depths)}: expected one depth")
    depth = depths.pop()
    items = []
    for k, v in node.items():
      if k == STACKED_BLOCKS:
        items += [(f"encoderblock_{i}", jax.tree.map(lambda x, i=i: take(x, i), sub))
                  for i in range(depth)]
      else:
        items.append((k, unstack_blocks(v, take)))
    return _rebuild(node, items)

  return jax.tree.map(convert, tree, is_leaf=is_blocks)
