"""EoMT against transformers' EomtForUniversalSegmentation with identical random weights: eval
outputs (square, and non-square through transformers' own code with its grid set to match),
masked attention in training with every query masked (intermediate and final predictions),
mask probability 0 equal to eval, semantic scores against a torch computation from the logits,
the masked-attention mask on hand-made logits, and parameter counts.

The transformers model runs in float64 with eager attention (randomly initialised from a small
config, offline) with every parameter randomised; its weights reach our model through what
`save_pretrained` writes (transformers' own layout) and the small mapping below,
independent of `segvit_jax.convert`. transformers does not return its intermediate predictions:
they are recorded by wrapping its `predict` method.
"""

from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

from segvit_jax.models import build_model, eomt, vit
from tests import support

TOL = 1e-4  # measured: mask logits <= 1.3e-5 (max |logit| ~16), class logits <= 8.2e-7
# (float32 Flax at "highest" matmul precision vs float64 torch)

HIDDEN, DEPTH, HEADS, NUM_BLOCKS, QUERIES, LABELS, IMAGE, PATCH, REGISTERS = (
    64, 5, 4, 2, 10, 7, 96, 16, 4)
GRID = IMAGE // PATCH  # 6
NON_SQUARE_GRID = (3, 12)  # as many patches as 6x6: transformers' position table fits it too


def _hf_config() -> transformers.EomtConfig:
  config = transformers.EomtConfig(
      hidden_size=HIDDEN, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
      num_blocks=NUM_BLOCKS, num_queries=QUERIES, num_labels=LABELS, image_size=IMAGE,
      patch_size=PATCH, num_register_tokens=REGISTERS, layerscale_value=0.5)
  config._attn_implementation = "eager"  # the plain softmax(q k^T + mask) v
  return config


def _model_cfg(grid: tuple[int, int] = (GRID, GRID)) -> dict:
  return {"name": "eomt", "num_classes": LABELS, "num_queries": QUERIES,
          "num_blocks": NUM_BLOCKS,
          "backbone": {"width": HIDDEN, "depth": DEPTH, "mlp_dim": 4 * HIDDEN,
                       "num_heads": HEADS, "patch_size": PATCH, "posemb_grid": grid,
                       "num_registers": REGISTERS, "layerscale": 1.0,
                       "posemb_resize": "bicubic_antialias"}}


# ---------------------------------------------------------------------------------------------
# transformers' saved layout -> our params

_LAYER = r"layers\.(?P<i>\d+)\."
_RENAMES = [  # (regex on a saved key without its last component, our module path)
    (r"embeddings\.patch_embeddings\.projection", "backbone/embedding"),
    (_LAYER + r"norm(?P<n>[12])", "backbone/encoderblock_{i}/norm{n}"),
    (_LAYER + r"attention\.(?P<x>[qkv]|out)_proj", "backbone/encoderblock_{i}/attn/{x}"),
    (_LAYER + r"mlp\.(?P<x>fc[12])", "backbone/encoderblock_{i}/mlp/{x}"),
    (r"layernorm", "backbone/encoder_norm"),
    (r"class_predictor", "head/class_head"),
    (r"mask_head\.(?P<x>fc[123])", "head/mask_head/{x}"),
    (r"upscale_block\.block\.(?P<i>\d+)\.(?P<x>conv[12])", "head/upscale_{i}/{x}"),
    (r"upscale_block\.block\.(?P<i>\d+)\.layernorm2d", "head/upscale_{i}/norm"),
]
_QKV = {"q": "query", "k": "key", "v": "value", "out": "out"}


def _set(params: dict, path: str, value: np.ndarray) -> None:
  *parents, leaf = path.split("/")
  node = params
  for part in parents:
    node = node.setdefault(part, {})
  assert leaf not in node, path
  node[leaf] = jnp.asarray(value, jnp.float32)


def hf_to_params(state: dict[str, torch.Tensor]) -> dict:
  """transformers' EoMT state dict (saved layout) -> our params."""
  params: dict = {}
  for key, tensor in state.items():
    v = tensor.detach().to(torch.float64).numpy()
    if key in ("attn_mask_probs", "criterion.empty_weight"):  # buffers
      continue
    if key == "embeddings.cls_token":
      _set(params, "backbone/cls", v)
    elif key == "embeddings.register_tokens":
      _set(params, "backbone/registers", v)
    elif key == "embeddings.position_embeddings.weight":  # (N, D), no cls slot: ours is zero
      _set(params, "backbone/pos_embedding",
           np.concatenate([np.zeros_like(v[:1]), v])[None])
    elif key == "query.weight":
      _set(params, "queries", v)
    elif m := re.fullmatch(_LAYER + r"layer_scale(?P<n>[12])\.lambda1", key):
      _set(params, f"backbone/encoderblock_{m['i']}/ls{m['n']}", v)
    else:
      prefix, leaf = key.rsplit(".", 1)
      for pattern, path in _RENAMES:
        if m := re.fullmatch(pattern, prefix):
          fields = {k: _QKV.get(f, f) for k, f in m.groupdict().items()}
          path = path.format(**fields)
          break
      else:
        raise KeyError(f"unmapped transformers key {key!r}")
      if leaf == "bias":
        name = "bias"
      elif prefix.endswith("conv1"):  # ConvTranspose2d (in, out, kh, kw): flip both axes
        name, v = "kernel", v.transpose(2, 3, 0, 1)[::-1, ::-1]
      elif v.ndim == 4:  # Conv2d (out, in / groups, kh, kw) -> (kh, kw, in / groups, out)
        name, v = "kernel", v.transpose(2, 3, 1, 0)
      elif v.ndim == 2:  # Linear (out, in) -> Dense (in, out)
        name, v = "kernel", v.T
      else:  # LayerNorm weight
        name = "scale"
      _set(params, f"{path}/{name}", np.ascontiguousarray(v))
  return params


def _randomize_(model: torch.nn.Module, seed: int) -> None:
  """Every parameter random: fan-in-scaled weights, norm scales and LayerScale around 1 and
  0.5, biases, tokens and position embeddings around 0."""
  g = torch.Generator().manual_seed(seed)
  randn = lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype)  # noqa: E731
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("lambda1"):
        p.copy_(0.5 + 0.1 * randn(p))
      elif name.endswith(("cls_token", "register_tokens", "position_embeddings.weight",
                          "query.weight")):
        p.copy_(randn(p))
      elif p.ndim > 1:
        p.copy_(randn(p) / np.sqrt(np.prod(p.shape[1:])))
      elif name.endswith("weight"):
        p.copy_(1.0 + 0.2 * randn(p))
      else:
        p.copy_(0.2 * randn(p))


def _images(h: int, w: int, seed: int, batch: int = 2) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((batch, h, w, 3)).astype(np.float32)


def _run_hf(hf, images: np.ndarray, *, train: bool, prob: float, grid: tuple[int, int]):
  """transformers' outputs: [(mask logits, class logits) of every predict call], the last
  being the final prediction, as float64 numpy."""
  hf.train(train)
  hf.grid_size = grid
  calls = []
  predict = hf.predict

  def record(x):
    out = predict(x)
    calls.append(out)
    return out

  hf.predict = record
  try:
    with torch.no_grad():
      hf.attn_mask_probs.fill_(prob)
      out = hf(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2).double())
  finally:
    del hf.predict
  final = (out.masks_queries_logits.numpy(), out.class_queries_logits.numpy())
  np.testing.assert_array_equal(calls[-1][0].numpy(), final[0])
  return [(m.numpy(), c.numpy()) for m, c in calls]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(our params, {case: (transformers predictions, our outputs)})."""
  torch.manual_seed(0)
  hf = transformers.EomtForUniversalSegmentation(_hf_config())
  hf = hf.double()
  _randomize_(hf, seed=1)
  path = tmp_path_factory.mktemp("eomt")
  hf.save_pretrained(path)
  params = hf_to_params(safetensors.torch.load_file(str(path / "model.safetensors")))
  model = build_model(_model_cfg())
  # Strict: exactly our parameters, with our shapes.
  abstract = nn.meta.unbox(jax.eval_shape(functools.partial(model.init, train=False),
                                          jax.random.key(0), jnp.zeros((1, IMAGE, IMAGE, 3))))
  assert set(abstract) == {"params"}
  assert jax.tree.structure(abstract["params"]) == jax.tree.structure(params)
  for want, got in zip(jax.tree.leaves(abstract["params"]), jax.tree.leaves(params)):
    assert want.shape == got.shape

  # Image seeds chosen so that no resized intermediate mask logit lies within 1e-3 of 0 (an
  # attention-mask entry that close could flip between float32 and float64).
  square, nsq = _images(IMAGE, IMAGE, 2), _images(*(np.array(NON_SQUARE_GRID) * PATCH), 4)
  cases = {  # name: (images, train, masking probability, grid)
      "eval": (square, False, 0.0, (GRID, GRID)),
      "masked": (square, True, 1.0, (GRID, GRID)),
      "train_p0": (square, True, 0.0, (GRID, GRID)),
      "eval_nonsquare": (nsq, False, 0.0, NON_SQUARE_GRID),
      "masked_nonsquare": (nsq, True, 1.0, NON_SQUARE_GRID),
  }
  # All torch runs first, then all JAX runs: on 2 CPU cores, torch calls made after JAX ones
  # ran several times slower here.
  want = {name: _run_hf(hf, x, train=t, prob=p, grid=g) for name, (x, t, p, g) in cases.items()}
  got = {}
  with jax.default_matmul_precision("highest"):
    for name, (x, train, prob, grid) in cases.items():
      model = build_model(_model_cfg(grid))
      fwd = jax.jit(functools.partial(model.apply, train=train))
      kwargs = {"mask_probs": jnp.full((NUM_BLOCKS,), prob)} if train else {}
      got[name] = jax.device_get(fwd({"params": params}, x, rngs={"dropout": jax.random.key(3)},
                                     **kwargs))
  return params, {name: (want[name], got[name]) for name in cases}


@pytest.mark.parametrize("case", ["eval", "eval_nonsquare"])
def test_eval_matches_transformers(setup, case):
  _, results = setup
  (want,), out = results[case]  # no intermediate predictions in eval with probabilities 0
  h, w = out["semantic_scores"].shape[2:]
  assert out["mask_logits"].shape == want[0].shape == (2, QUERIES, h // 4, w // 4)
  assert out["class_logits"].shape == want[1].shape == (2, QUERIES, LABELS + 1)
  assert out["aux_outputs"] == []
  masks = support.max_diff(out["mask_logits"], want[0])
  classes = support.max_diff(out["class_logits"], want[1])
  print(f"{case}: max |mask logit| {np.max(np.abs(want[0])):.1f} diff {masks:.2e}; "
        f"max |class logit| {np.max(np.abs(want[1])):.1f} diff {classes:.2e}")
  assert masks < TOL and classes < TOL


@pytest.mark.parametrize("case", ["masked", "masked_nonsquare"])
def test_masked_attention_matches_transformers(setup, case):
  """Masking probability 1 in training mode: no randomness; every intermediate prediction and
  the final one equal transformers'."""
  _, results = setup
  want, out = results[case]
  got = [(a["mask_logits"], a["class_logits"]) for a in out["aux_outputs"]]
  got.append((out["mask_logits"], out["class_logits"]))
  assert len(got) == len(want) == NUM_BLOCKS + 1
  grid = NON_SQUARE_GRID if "nonsquare" in case else (GRID, GRID)
  for j, ((gm, gc), (wm, wc)) in enumerate(zip(got, want)):
    masks, classes = support.max_diff(gm, wm), support.max_diff(gc, wc)
    if j < NUM_BLOCKS:  # the attention mask this prediction gives: non-trivial, and robust
      small = torch.nn.functional.interpolate(torch.from_numpy(wm), size=grid, mode="bilinear")
      margin = float(small.abs().min())
      print(f"{case} prediction {j}: allowed query-patch pairs {(small > 0).double().mean():.2f}"
            f", min |resized logit| {margin:.1e}", end="; ")
      assert 0.1 < float((small > 0).double().mean()) < 0.9 and margin > 1e-3
    print(f"{case} prediction {j}: mask diff {masks:.2e}, class diff {classes:.2e}")
    assert masks < TOL and classes < TOL, (j, masks, classes)
  # The masks matter: the final prediction differs from the unmasked one.
  eval_case = "eval_nonsquare" if "nonsquare" in case else "eval"
  assert support.max_diff(out["mask_logits"], results[eval_case][1]["mask_logits"]) > 1e-2


def test_probability_zero_in_training_equals_eval(setup):
  _, results = setup
  want, out = results["train_p0"]
  ref = results["eval"][1]
  assert len(out["aux_outputs"]) == NUM_BLOCKS  # still predicted (and supervised)
  # Two programs (the training one applies the masks it is given, here none): their float32
  # rounding may differ where XLA fuses them differently. Measured: bitwise equal with XLA's
  # default CPU emitters, <= 5.7e-6 (mask logits up to ~16) with the loop emitters the tests
  # compile with; any row masked moves the mask logits by > 1e-2 (the test above).
  for key in ("class_logits", "mask_logits", "semantic_scores"):
    print(f"train p=0 vs eval {key}: max diff {support.max_diff(out[key], ref[key]):.1e}")
    np.testing.assert_allclose(out[key], ref[key], rtol=0, atol=2e-5)
  # transformers in training mode with probability 0 (every row unmasked) agrees.
  assert support.max_diff(out["mask_logits"], want[-1][0]) < TOL
  for a, (wm, wc) in zip(out["aux_outputs"], want):
    assert support.max_diff(a["mask_logits"], wm) < TOL
    assert support.max_diff(a["class_logits"], wc) < TOL


@pytest.mark.parametrize("case", ["eval", "eval_nonsquare", "masked"])
def test_semantic_scores_from_the_logits(setup, case):
  """Mask logits resized bilinearly to the input, then sigmoid; class softmax without the
  no-object column; summed over queries (transformers' post_process_semantic_segmentation)."""
  _, results = setup
  _, out = results[case]
  h, w = out["semantic_scores"].shape[2:]
  masks = torch.nn.functional.interpolate(torch.from_numpy(np.asarray(out["mask_logits"],
                                                                      np.float64)),
                                          size=(h, w), mode="bilinear", align_corners=False)
  probs = torch.from_numpy(np.asarray(out["class_logits"], np.float64)).softmax(-1)[..., :-1]
  want = torch.einsum("bqc,bqhw->bchw", probs, masks.sigmoid()).numpy()
  assert out["semantic_scores"].shape == want.shape == (2, LABELS, h, w)
  assert support.max_diff(out["semantic_scores"], want) < 1e-5


def test_remat_and_bfloat16(setup):
  """Masked training (probabilities 1 and 0.5): remat changes nothing; bfloat16 stays close
  and returns float32 logits."""
  params, _ = setup
  x, probs = _images(IMAGE, IMAGE, 2), jnp.array([1.0, 0.5])

  def run(**overrides):
    cfg = _model_cfg()
    cfg = {**cfg, "dtype": overrides.pop("dtype", "float32"),
           "backbone": {**cfg["backbone"], **overrides}}
    fwd = jax.jit(functools.partial(build_model(cfg).apply, train=True))
    return jax.device_get(fwd({"params": params}, x, mask_probs=probs,
                              rngs={"dropout": jax.random.key(3)}))

  with jax.default_matmul_precision("highest"):
    ref, remat, bf16 = run(), run(remat=True), run(dtype="bfloat16")
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(remat)):
    np.testing.assert_array_equal(a, b)
  assert {bf16[k].dtype for k in ("class_logits", "mask_logits", "semantic_scores")} == {
      np.dtype(np.float32)}
  scale = np.max(np.abs(ref["class_logits"]))
  diff = support.max_diff(bf16["class_logits"], ref["class_logits"])
  print(f"bfloat16: class logits diff {diff:.2e} (max |logit| {scale:.1f})")
  assert diff < 0.05 * scale


def test_backbone_is_the_vit_and_model_init_fills_it(tmp_path):
  """EoMT's backbone parameters are exactly `vit.ViT`'s, so `config.model_init` loads a DINOv2
  checkpoint (here timm's layout of a patch-14 model with registers) into it unchanged: patch
  kernel resampled to 16, position grid resized, merged strictly; the rest untouched."""
  from tests import checkpoint_writers  # pylint: disable=g-import-not-at-top
  from segvit_jax import convert  # pylint: disable=g-import-not-at-top

  cfg = _model_cfg()
  cfg["backbone"] = {**cfg["backbone"], "variant": "dinov2-mu/14-reg4"}
  model = build_model(cfg)
  init = functools.partial(model.init, train=False)
  abstract = nn.meta.unbox(jax.eval_shape(init, jax.random.key(0),
                                          jnp.zeros((1, IMAGE, IMAGE, 3))))["params"]
  backbone = vit.ViT(**eomt.backbone_fields(cfg["backbone"]))
  want = nn.meta.unbox(jax.eval_shape(backbone.init, jax.random.key(0),
                                      jnp.zeros((1, IMAGE, IMAGE, 3))))["params"]
  assert jax.tree.structure(abstract["backbone"]) == jax.tree.structure(want)
  assert [x.shape for x in jax.tree.leaves(abstract["backbone"])] == [
      x.shape for x in jax.tree.leaves(want)]

  dinov2 = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
      hidden_size=HIDDEN, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
      intermediate_size=4 * HIDDEN, image_size=56, patch_size=14,
      num_register_tokens=REGISTERS))
  _randomize_(dinov2, seed=5)
  sd = checkpoint_writers.timm_from_hf_dinov2(checkpoint_writers.hf_saved_state_dict(dinov2))
  path = str(tmp_path / "dinov2.safetensors")
  checkpoint_writers.save_safetensors(path, sd)
  zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract)
  params = convert.init_params(zeros, cfg, path, "timm")
  assert jax.tree.structure(params) == jax.tree.structure(zeros)
  np.testing.assert_array_equal(params["backbone"]["registers"], sd["reg_token"])
  np.testing.assert_array_equal(params["backbone"]["encoderblock_3"]["ls2"],
                                sd["blocks.3.ls2.gamma"])
  assert params["backbone"]["embedding"]["kernel"].shape == (PATCH, PATCH, 3, HIDDEN)
  assert all(np.any(x != 0) for x in jax.tree.leaves(params["backbone"]))
  assert not any(np.any(x != 0) for k in ("head", "queries")
                 for x in jax.tree.leaves(params[k]))


def test_query_attention_mask():
  """Hand-made logits: only the query-to-patch block is masked, by logit > 0 after the
  bilinear resize, on the rows drawn with probability `prob`."""
  b, k, n_prefix, grid = 64, 50, 5, (2, 3)
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.standard_normal((b, k, 8, 12)), jnp.float32)
  resized = torch.nn.functional.interpolate(torch.from_numpy(np.array(logits)), size=grid,
                                            mode="bilinear").numpy().reshape(b, k, -1)
  n = k + n_prefix + 6
  allowed = resized > 0
  visible = ~allowed.all(-1)  # rows where masking changes something
  assert visible.mean() > 0.9
  for prob in (0.0, 0.3, 1.0):
    mask = np.asarray(eomt.query_attention_mask(logits, grid, n_prefix, prob,
                                                jax.random.key(1)))
    assert mask.shape == (b, 1, n, n) and mask.dtype == bool
    block = mask[:, 0, :k, k + n_prefix:]
    rest = mask[:, 0].copy()
    rest[:, :k, k + n_prefix:] = True
    assert rest.all()  # query-query, query-prefix, prefix and patch rows: never masked
    masked_rows = (block == allowed).all(-1) & visible
    assert (masked_rows | block.all(-1)).all()  # a row is either masked or left alone
    frac = masked_rows[visible].mean()
    if prob in (0.0, 1.0):
      assert frac == prob
    else:
      assert abs(frac - prob) < 0.03, frac  # about 3000 rows
  a = eomt.query_attention_mask(logits, grid, n_prefix, 0.5, jax.random.key(1))
  b2 = eomt.query_attention_mask(logits, grid, n_prefix, 0.5, jax.random.key(2))
  assert (np.asarray(a) != np.asarray(b2)).any()


def test_mask_probs_shape_is_checked():
  model = build_model(_model_cfg())
  with pytest.raises(ValueError, match=r"expected \(2,\), one probability per block"):
    jax.eval_shape(functools.partial(model.init, train=True, mask_probs=jnp.ones(3)),
                   jax.random.key(0), jnp.zeros((1, IMAGE, IMAGE, 3)))


# ---------------------------------------------------------------------------------------------
# Parameter counts

def expected_param_count(width: int, depth: int, ffn_hidden: int, swiglu: bool, grid: int,
                         registers: int, patch: int, queries: int, classes: int) -> int:
  """EoMT parameters: the DINOv2 ViT (with a zero position slot for the cls token), the
  queries, the class head, the 3-layer mask MLP and the up-scaling blocks."""
  d, h = width, ffn_hidden
  embed = patch * patch * 3 * d + d + (1 + grid * grid) * d + d + registers * d
  ffn = (3 * d * h + 2 * h + d) if swiglu else (2 * d * h + h + d)
  block = 2 * 2 * d + 4 * (d * d + d) + ffn + 2 * d  # norms, attention, FFN, LayerScale
  backbone = embed + depth * block + 2 * d
  upscale = eomt.num_upscale_blocks(patch) * (4 * d * d + d + 9 * d + 2 * d)
  head = queries * d + d * (classes + 1) + classes + 1 + 3 * (d * d + d) + upscale
  return backbone + head


def _count(model: nn.Module, size: int = 64) -> int:
  abstract = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                            jnp.zeros((1, size, size, 3)))
  return sum(x.size for x in jax.tree.leaves(nn.meta.unbox(abstract)["params"]))


# L2, the blocks that see the queries, per size (EoMT App. A.1, "Queries.", Table D).
NUM_QUERY_BLOCKS = {"S": 3, "B": 3, "L": 4, "g": 5}
# size: exact count at 640 px, 200 queries, 133 classes (COCO panoptic)
PARAM_COUNTS = {"S": 23_976_326, "B": 93_663_878, "L": 316_696_710, "g": 1_163_623_558}
_HF_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "g": (1536, 40, 24)}


@pytest.mark.parametrize("size", sorted(PARAM_COUNTS))
def test_parameter_counts(size):
  model = eomt.Model(size, num_classes=133, num_queries=200,
                     num_blocks=NUM_QUERY_BLOCKS[size], image_size=640)
  width, depth, heads = _HF_SIZES[size]
  ffn = 4096 if size == "g" else 4 * width
  count = _count(model)
  assert count == expected_param_count(width, depth, ffn, size == "g", 40, 4, 16, 200, 133)
  assert count == PARAM_COUNTS[size]
  config = transformers.EomtConfig(
      hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
      num_blocks=NUM_QUERY_BLOCKS[size], num_queries=200, num_labels=133, image_size=640,
      patch_size=16, use_swiglu_ffn=size == "g")
  with torch.device("meta"):
    hf = transformers.EomtForUniversalSegmentation(config)
  # Ours has one more position slot (the cls token's, zero when converted).
  assert sum(p.numel() for p in hf.parameters()) + width == count


def test_parameter_count_of_the_small_model(setup):
  params, _ = setup
  hf = transformers.EomtForUniversalSegmentation(_hf_config())
  count = sum(x.size for x in jax.tree.leaves(params))
  assert count == _count(build_model(_model_cfg()), IMAGE)
  assert count == sum(p.numel() for p in hf.parameters()) + HIDDEN
  assert count == expected_param_count(HIDDEN, DEPTH, 4 * HIDDEN, False, GRID, REGISTERS, PATCH,
                                       QUERIES, LABELS)
