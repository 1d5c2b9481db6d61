"""EoMT, the Encoder-only Mask Transformer (Kerssies et al., "Your ViT is Secretly an Image
Segmentation Model", CVPR 2025; Sec. 3.3, Fig. 2 and 3; inference: App. A.3).

A plain DINOv2 ViT with registers (`vit.ViT`, run at patch 16) does the whole job: the first
L - L2 blocks see [cls | registers | patches]; then K learnable queries (no position
embedding) are prepended and the last L2 blocks run on [queries | cls | registers | patches]
(the order of the release and of transformers' EomtForUniversalSegmentation). A light head
on the output of the backbone's own final LayerNorm (`encoder_norm`) predicts, per query,
  class logits   Dense(D -> C + 1) (last = no object),
  mask logits    einsum(mask MLP(query), pixel features): the MLP is Dense-GELU-Dense-GELU-Dense
                 (D -> D), the pixel features are the patch tokens on their grid up-scaled by
                 max(1, int(log2(patch)) - 2) ScaleBlocks (ConvTranspose 2x2 stride 2 -> GELU ->
                 depthwise 3x3 conv without bias -> LayerNorm over channels): 1/4 of the input
                 at patch 16.

Masked attention (training only): before each of the last L2 blocks the same head makes an
intermediate prediction; its mask logits, bilinearly resized to the patch grid (torch's
F.interpolate, align_corners=False, no antialias), restrict each query to the patches where
they are > 0; every other pair (query-query, query-cls/registers, anything from cls,
registers or patches) is never masked. Each (image, query) row stays masked with probability
P_mask(block), given by the `mask_probs` call argument (L2,), a traced array the trainer
computes from the step (`mask_annealing`, the annealing schedule, spec "Architecture" 6;
`training_inputs` reads its windows from the config): a row is masked iff
u < P with u ~ U[0, 1) drawn per (image, query) from the "dropout" rng stream, so P = 1 masks
every row and P = 0 none. `mask_probs=None` or `train=False` runs the plain model: no masks, no
intermediate predictions (inference costs the plain ViT plus one head). With `mask_probs`
the intermediate predictions are computed and returned even where P = 0: every one is
supervised (the release, and transformers in training mode, do the same).

The release trains without drop path (its forward bypasses the blocks' drop path);
`backbone.drop_path` still works here if set.

On DINOv3 (the release's second model zoo; transformers' EomtDinov3ForUniversalSegmentation):
the backbone is a `dinov3-` ViT (rotary position embeddings, no position table). The rotary
embedding of the patch grid is computed once per forward pass and rotates only the patch
tokens: queries, cls and registers are prefix tokens, as in transformers.

Parameters: `backbone/...` exactly the layout of `vit.ViT` (`embedding`, `pos_embedding` with
its cls slot, `cls`, `registers`, `encoderblock_{i}`, `encoder_norm`), so DINOv2 converters and
`model_init` fill it unchanged; `queries` (K, D); `head/class_head`,
`head/mask_head/{fc1,fc2,fc3}`, `head/upscale_{i}/{conv1 (ConvTranspose), conv2 (depthwise),
norm}`. Checkpoint layouts (the release's, transformers'): a torch ConvTranspose2d weight
(in, out, kh, kw) is our `conv1/kernel` (kh, kw, in, out) with BOTH spatial axes flipped,
`w.transpose(2, 3, 0, 1)[::-1, ::-1]` (`cpu_ops.PatchConvTranspose` has Flax ConvTranspose's
parameters, and like it does not flip its kernel; checked against transformers in
tests/models/test_eomt_vs_hf.py); a depthwise Conv2d weight (D, 1, 3, 3) is
`conv2/kernel` (3, 3, 1, D); transformers' `embeddings.position_embeddings.weight` (N, D) has
no cls slot (the cls token carries no position): slot 0 of our `pos_embedding` is zero.

Output dict (`EoMT.__call__`):
  class_logits     (B, K, C + 1)  final prediction
  mask_logits      (B, K, H/4, W/4)  final mask logits at the head's resolution (the loss's)
  aux_outputs      list of L2 {class_logits, mask_logits} intermediate predictions in block
                   order (training with `mask_probs` only; [] otherwise)
  semantic_scores  (B, C, H, W)   sum_q softmax(class)[:-1] * sigmoid(mask logits bilinearly
                                  resized to the input), EoMT's semantic inference
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from segvit_jax.models import cpu_ops, layers, vit

# The DINOv2 sizes EoMT is built on (`Model`).
SIZES = ("S", "B", "L", "g")

# torch's default Linear / Conv init (kaiming_uniform with a = sqrt(5)), as the release's heads.
_torch_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
_gelu = functools.partial(nn.gelu, approximate=False)


def num_upscale_blocks(patch_size: int) -> int:
  """ScaleBlocks after the patch grid: max(1, int(log2(patch)) - 2), 2 at patch 16 (1/4)."""
  return max(1, int(math.log2(patch_size)) - 2)


def query_attention_mask(mask_logits: jax.Array, grid: tuple[int, int], num_prefix: int,
                         prob: jax.Array, rng: jax.Array) -> jax.Array:
  """EoMT's masked-attention mask for tokens [queries | prefix (cls, registers) | patches].

  mask_logits (B, K, h, w) -> boolean (B, 1, T, T), T = K + num_prefix + gh * gw, True = may
  attend. Query q may attend to patch p iff its logit resized bilinearly to `grid` is > 0;
  each (image, query) row is left unmasked unless u < `prob` (u ~ U[0, 1) from `rng`); every
  entry outside the query-to-patch block is True."""
  b, k = mask_logits.shape[:2]
  n_patch = grid[0] * grid[1]
  logits = layers.upsample_masks(mask_logits.astype(jnp.float32), grid).reshape(b, k, n_patch)
  masked_rows = jax.random.uniform(rng, (b, k)) < jnp.asarray(prob, jnp.float32)
  allowed = jnp.logical_or(logits > 0, ~masked_rows[..., None])  # (B, K, gh * gw)
  n = k + num_prefix + n_patch
  mask = jnp.ones((b, n, n), bool).at[:, :k, k + num_prefix:].set(allowed)
  return mask[:, None]


class ScaleBlock(nn.Module):
  """2x up-scaling of (B, h, w, D) pixel features: ConvTranspose(2, stride 2) -> GELU ->
  depthwise 3x3 conv (no bias) -> LayerNorm over channels (eps 1e-6, as the release)."""

  norm_eps: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    x = cpu_ops.PatchConvTranspose(d, 2, dtype=self.dtype, name="conv1",
                                   kernel_init=layers.logical(_torch_init,
                                                              (None, None, "embed", None)),
                                   bias_init=layers.logical(nn.initializers.zeros, (None,)))(x)
    x = cpu_ops.DepthwiseConv(3, use_bias=False, dtype=self.dtype, name="conv2",
                              kernel_init=layers.logical(_torch_init,
                                                         (None, None, None, "embed")))(_gelu(x))
    x = layers.layer_norm("norm", self.norm_eps, self.dtype)(x)
    return layers.constrain(x, ("act_batch", None, None, "act_embed"))


class MaskMLP(nn.Module):
  """The mask-embedding MLP on the query tokens: Dense-GELU-Dense-GELU-Dense, D -> D."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    axes = [("embed", "mlp"), ("mlp", "embed"), ("embed", None)]
    for i, (ax_in, ax_out) in enumerate(axes):
      x = nn.Dense(d, dtype=self.dtype, name=f"fc{i + 1}",
                   kernel_init=layers.logical(_torch_init, (ax_in, ax_out)),
                   bias_init=layers.logical(nn.initializers.zeros, (ax_out,)))(x)
      if i < len(axes) - 1:
        x = _gelu(x)
    return x


class EoMTHead(nn.Module):
  """The prediction head: (normalised query tokens (B, K, D), normalised patch tokens on their
  grid (B, gh, gw, D)) -> (class_logits (B, K, C + 1), mask_logits (B, K, s gh, s gw)),
  s = 2 ** num_upscale."""

  num_classes: int
  num_upscale: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, queries: jax.Array, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
    class_logits = nn.Dense(
        self.num_classes + 1, dtype=self.dtype, name="class_head",
        kernel_init=layers.logical(_torch_init, ("embed", "classes")),
        bias_init=layers.logical(nn.initializers.zeros, ("classes",)))(queries)
    mask_embed = MaskMLP(dtype=self.dtype, name="mask_head")(queries)  # (B, K, D)
    for i in range(self.num_upscale):
      pixels = ScaleBlock(dtype=self.dtype, name=f"upscale_{i}")(pixels)  # (B, h, w, D)
    mask_logits = jnp.einsum("bqc,bhwc->bqhw", mask_embed, pixels)
    return class_logits, mask_logits


class EoMTEncoder(vit.ViT):
  """The ViT run EoMT's way (same fields and parameters as `vit.ViT`; blocks unrolled).

  Called with the learnable `queries` (K, D), the `head` (a bound `EoMTHead`, whose parameters
  live outside the backbone), L2 = `num_query_blocks` and `mask_probs` (L2,) or None. Returns
  ((class_logits, mask_logits) of the final prediction, [intermediate predictions])."""

  @nn.compact
  def __call__(self, images: jax.Array, queries: jax.Array,
               head: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]],
               num_query_blocks: int, mask_probs: jax.Array | None = None, *,
               train: bool = False):
    if self.scan_layers:
      raise ValueError("EoMT runs its ViT blocks unrolled: set backbone.scan_layers=False")
    if not self.final_norm:
      raise ValueError("EoMT predicts after the backbone's final LayerNorm: set "
                       "backbone.final_norm=True")
    if not 1 <= num_query_blocks <= self.depth:
      raise ValueError(f"num_blocks={num_query_blocks} out of range for a {self.depth}-block "
                       "ViT")
    masked = train and mask_probs is not None
    if masked and jnp.shape(mask_probs) != (num_query_blocks,):
      raise ValueError(f"mask_probs has shape {jnp.shape(mask_probs)}; expected "
                       f"({num_query_blocks},), one probability per block that sees the queries")

    x, grid, n_prefix = self.embed(images)
    b, d, k = x.shape[0], self.width, queries.shape[0]
    drop, dpr, keys = self.block_schedule(train)
    rope = self.rotary_embedding(grid, train)
    make_block = self.block_factory()
    norm = self.final_layer_norm()
    mask_keys = jax.random.split(self.make_rng("dropout"), num_query_blocks) if masked else None

    def predict(x):
      x = norm(x)
      return head(x[:, :k], x[:, k + n_prefix:].reshape(b, *grid, d))

    first = self.depth - num_query_blocks
    aux = []
    for i in range(self.depth):
      mask = None
      if i == first:  # [queries | cls | registers | patches]
        q = jnp.broadcast_to(queries.astype(x.dtype)[None], (b, k, d))
        x = layers.constrain(jnp.concatenate([q, x], axis=1),
                             ("act_batch", "act_len", "act_embed"))
      if masked and i >= first:
        class_logits, mask_logits = predict(x)
        aux.append((class_logits, mask_logits))
        mask = query_attention_mask(mask_logits, grid, n_prefix, mask_probs[i - first],
                                    mask_keys[i - first])
      x = make_block(name=f"encoderblock_{i}")(
          x, not drop, float(dpr[i]), None if keys is None else keys[i], None, mask, rope=rope)
    return predict(x), aux


class EoMT(nn.Module):
  """EoMT: `backbone` holds `vit.ViT` fields (incl. `variant`, e.g. "dinov2-L/14-reg4" with
  `patch_size=16` and `posemb_grid` = crop / 16), `num_queries` K, `num_blocks` L2 (the last
  blocks, which see the queries); `attention` the blocks' attention implementation
  (`layers.ATTENTION_IMPLEMENTATIONS`; "auto" keeps the masked blocks of training on XLA)."""

  num_classes: int
  num_queries: int
  num_blocks: int
  backbone: dict
  attention: str = "auto"
  dtype: Any = jnp.float32

  def setup(self):
    fields = backbone_fields(self.backbone)
    self.encoder = EoMTEncoder(**fields, attention=self.attention, dtype=self.dtype,
                               name="backbone")
    self.queries = self.param("queries",
                              layers.logical(nn.initializers.normal(1.0), ("queries", "embed")),
                              (self.num_queries, fields["width"]))
    self.head = EoMTHead(self.num_classes, num_upscale_blocks(fields["patch_size"]),
                         dtype=self.dtype, name="head")

  def __call__(self, images: jax.Array, *, train: bool = False,
               mask_probs: jax.Array | None = None) -> dict[str, Any]:
    """`mask_probs` (L2,): masked-attention probabilities of the last L2 blocks (training
    only; None: no masked attention, no intermediate predictions)."""
    (class_logits, mask_logits), aux = self.encoder(
        images.astype(self.dtype), self.queries, self.head, self.num_blocks, mask_probs,
        train=train)
    f32 = lambda c, m: {"class_logits": c.astype(jnp.float32),  # noqa: E731
                        "mask_logits": m.astype(jnp.float32)}
    final = f32(class_logits, mask_logits)
    masks = layers.upsample_masks(final["mask_logits"], images.shape[1:3])
    return {
        **final,
        "aux_outputs": [f32(c, m) for c, m in aux],
        "semantic_scores": layers.semantic_scores(final["class_logits"], masks),
    }


def backbone_fields(backbone: dict) -> dict[str, Any]:
  """A config's backbone dict -> `vit.ViT` fields (the variant decoded, overrides applied)."""
  bb = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(backbone).items()}
  if bb.pop("type", "vit") != "vit":
    raise ValueError("EoMT needs a plain ViT backbone (backbone.type='vit')")
  if bb.pop("shrink_idx", None) is not None:
    raise ValueError("EoMT runs its ViT blocks without query down-sampling: set "
                     "backbone.shrink_idx=None")
  variant = bb.pop("variant", None)
  return {**(vit.decode_variant(variant) if variant else {}), **bb}


def Model(variant: str, *, num_classes: int, num_queries: int,  # noqa: N802 (factory name)
          num_blocks: int, image_size: int, backbone: dict | None = None,
          dtype: Any = jnp.float32) -> EoMT:
  """`Model("L", num_classes=133, num_queries=200, num_blocks=4, image_size=640)`: EoMT-S/B/L/g
  on DINOv2 with 4 registers at patch 16, position grid image_size / 16, queries in the last
  `num_blocks` blocks; `backbone` overrides ViT fields."""
  if variant not in SIZES:
    raise ValueError(f"unknown EoMT size {variant!r}; expected one of {sorted(SIZES)}")
  bb = {"variant": f"dinov2-{variant}/14-reg4", "patch_size": 16, **(backbone or {})}
  grid = image_size // bb["patch_size"]
  bb.setdefault("posemb_grid", (grid, grid))
  return EoMT(num_classes=num_classes, num_queries=num_queries, num_blocks=num_blocks,
              backbone=bb, dtype=dtype)


def from_config(model_cfg: Mapping[str, Any], dtype: Any) -> EoMT:
  """The EoMT a `config.model` (name "eomt") describes."""
  return EoMT(num_classes=model_cfg["num_classes"], num_queries=model_cfg["num_queries"],
              num_blocks=model_cfg["num_blocks"], backbone=dict(model_cfg["backbone"]),
              attention=layers.attention_setting(model_cfg), dtype=dtype)


def backbone_from_config(model_cfg: Mapping[str, Any], dtype: Any) -> vit.ViT:
  """EoMT's ViT alone, as a plain `vit.ViT` with its final norm (its parameters: the model's
  "backbone")."""
  return vit.ViT(**backbone_fields(model_cfg["backbone"]),
                 attention=layers.attention_setting(model_cfg), dtype=dtype)


def input_divisor(model_cfg: Mapping[str, Any]) -> int:
  """Input sides must be multiples of the patch size."""
  return vit.patch_size(model_cfg["backbone"])


def mask_annealing(step: jax.Array, starts: Sequence[int], ends: Sequence[int],
                   power: float) -> jax.Array:
  """EoMT's masked-attention annealing (EoMT Sec. 3.3 "Mask annealing.", Fig. 4): the masking
  probability of each of the L2 query blocks at the 0-based `step`, (L2,) float32: 1 before
  its window's start, 0 from its end on, (1 - (t - start) / (end - start)) ** power in
  between. A function of the step alone, so a resumed run (which restores the step) continues
  the schedule."""
  if len(starts) != len(ends):
    raise ValueError(f"mask annealing: {len(starts)} start steps but {len(ends)} end steps")
  if any(e <= s for s, e in zip(starts, ends)):
    raise ValueError(f"mask annealing windows must end after they start: starts "
                     f"{tuple(starts)}, ends {tuple(ends)}")
  t = jnp.asarray(step, jnp.float32)
  s, e = jnp.asarray(starts, jnp.float32), jnp.asarray(ends, jnp.float32)
  remaining = jnp.clip((e - t) / (e - s), 0.0, 1.0)  # 1 - progress, without cancellation
  return jnp.where(t < s, 1.0, jnp.where(t >= e, 0.0, remaining ** power))


def training_inputs(model_cfg: Mapping[str, Any], step: jax.Array | None) -> dict[str, Any]:
  """Step-dependent inputs of the training-mode forward pass: the masked-attention
  probabilities of the last L2 blocks, `mask_probs`, from `model.mask_annealing` (its
  `start_steps`, `end_steps`, `power`; with `enabled=False` or none, no masking and no
  intermediate predictions)."""
  ann = model_cfg.get("mask_annealing", None)
  if ann is None or not ann["enabled"]:
    return {}
  if step is None:
    raise ValueError("EoMT's mask annealing needs the training step")
  return {"mask_probs": mask_annealing(step, tuple(ann["start_steps"]),
                                       tuple(ann["end_steps"]), ann["power"])}
