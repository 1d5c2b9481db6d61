"""Self-test of tests/checkpoint_writers.py: the foreign layouts it writes reproduce the HF model.

Tiny random HF models (width 32, 2 layers, 2 heads, patch 8, image 32). Every layout is read back
by a small float64 numpy ViT written here (`_forward`) and compared with HF's last_hidden_state;
a few parts (patch embedding, q projection, qkv split, SwiGLU packing, register fold, chunk
naming) are also checked one by one against the HF modules themselves.
"""

from __future__ import annotations

import ast
import math
import pathlib
import pickle
import re

import numpy as np
import pytest
import torch
import transformers

from tests import checkpoint_writers as cw

D, DEPTH, HEADS, PATCH, IMAGE = 32, 2, 2, 8, 32
HD, N = D // HEADS, (IMAGE // PATCH) ** 2
ATOL = 2e-4


def _randomise(model, seed):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():  # zeros / ones at init would hide swapped tensors
      p.copy_(0.2 * torch.randn(p.shape, generator=g))
  return model.eval()


@pytest.fixture(scope="module")
def models():
  common = dict(hidden_size=D, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                patch_size=PATCH, image_size=IMAGE)
  built = {
      "vit": transformers.ViTModel(transformers.ViTConfig(intermediate_size=2 * D, **common)),
      "dinov2": transformers.Dinov2Model(transformers.Dinov2Config(**common)),
      "dinov2_swiglu": transformers.Dinov2Model(
          transformers.Dinov2Config(use_swiglu_ffn=True, **common)),
      "dinov2_reg": transformers.Dinov2WithRegistersModel(
          transformers.Dinov2WithRegistersConfig(num_register_tokens=4, **common)),
  }
  out = {}
  for seed, (name, m) in enumerate(built.items()):
    _randomise(m, seed)
    out[name] = (m, cw.hf_saved_state_dict(m), m.config.layer_norm_eps)
  return out


@pytest.fixture(scope="module")
def image():
  return np.random.default_rng(0).normal(size=(2, 3, IMAGE, IMAGE)).astype(np.float32)


def _hf_out(model, img):
  with torch.no_grad():
    return model(pixel_values=torch.from_numpy(img)).last_hidden_state.numpy()


def _module(model, *names):
  """The first of `names` that exists (in-memory module names differ across transformers)."""
  for n in names:
    try:
      return model.get_submodule(n)
    except AttributeError:
      pass
  raise AttributeError(f"none of {names}")


def _hf_query(model):
  return _module(model, "layers.0.attention.q_proj", "encoder.layer.0.attention.q_proj",
                 "encoder.layer.0.attention.attention.query")


# ----------------------------------------------------------------------------------------------
# An independent float64 numpy ViT over a canonical parameter form, and readers of each layout.

_erf = np.vectorize(math.erf)


def _ln(x, s, b, eps):
  m = x.mean(-1, keepdims=True)
  return (x - m) / np.sqrt(((x - m) ** 2).mean(-1, keepdims=True) + eps) * s + b


def _gelu(x):
  return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


def _silu(x):
  return x / (1 + np.exp(-x))


def _forward(c, img, eps):
  """c: patch_kernel (p,p,3,D), patch_bias, cls (D,) with its position added, reg (R,D),
  patch_pos (N,D), blocks [{ln1, w/b q k v o as x @ W, ls1, ln2, mlp, ls2}], norm."""
  b, _, h, w = img.shape
  x = img.astype(np.float64).reshape(b, 3, h // PATCH, PATCH, w // PATCH, PATCH)
  x = np.einsum("bchpwq,pqcd->bhwd", x, c["patch_kernel"]).reshape(b, -1, D) + c["patch_bias"]
  t = np.concatenate([np.broadcast_to(c["cls"], (b, 1, D)),
                      np.broadcast_to(c["reg"], (b,) + c["reg"].shape), x + c["patch_pos"]], 1)
  n = t.shape[1]
  for blk in c["blocks"]:
    y = _ln(t, *blk["ln1"], eps)
    q, k, v = ((y @ blk["w" + s] + blk["b" + s]).reshape(b, n, HEADS, HD) for s in "qkv")
    a = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(HD)
    a = np.exp(a - a.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, n, D) @ blk["wo"] + blk["bo"]
    t = t + blk["ls1"] * o
    t = t + blk["ls2"] * blk["mlp"](_ln(t, *blk["ln2"], eps))
  return _ln(t, *c["norm"], eps)


def _split_pos(cls, pos):
  """cls (D,) and pos (n,D) -> (cls with its position, patch positions): cls slot iff n = 1+N."""
  assert pos.shape[0] in (N, N + 1), pos.shape
  return (cls + pos[0], pos[1:]) if pos.shape[0] == N + 1 else (cls, pos)


def _canon_from_npz(flat, flavour):
  pre = {"params": "params/", "params_img_posemb": "params/img/"}.get(flavour, "")
  mha, ln1, ln2, mlp = (("MultiHeadDotProductAttention_1", "LayerNorm_0", "LayerNorm_2",
                         "MlpBlock_3") if flavour == "prelinen" else
                        ("MultiHeadDotProductAttention_0", "LayerNorm_0", "LayerNorm_1",
                         "MlpBlock_0"))
  pos = flat.get(pre + "pos_embedding", flat.get(pre + "Transformer/posembed_input/pos_embedding"))
  cls, patch_pos = _split_pos(flat[pre + "cls"][0, 0], pos[0])

  def blk(i, k):
    if flavour == "stacked":
      return flat[f"{pre}Transformer/encoderblock/{k}"][i]
    return flat[f"{pre}Transformer/encoderblock_{i}/{k}"]

  blocks = []
  for i in range(DEPTH):
    g = lambda k, i=i: blk(i, k)  # noqa: E731
    w0, b0, w1, b1 = (g(f"{mlp}/Dense_{j}/{s}") for j in (0, 1) for s in ("kernel", "bias"))
    e = {"ln1": (g(f"{ln1}/scale"), g(f"{ln1}/bias")), "ln2": (g(f"{ln2}/scale"), g(f"{ln2}/bias")),
         "wo": g(f"{mha}/out/kernel").reshape(D, D), "bo": g(f"{mha}/out/bias"), "ls1": 1, "ls2": 1,
         "mlp": lambda y, w0=w0, b0=b0, w1=w1, b1=b1: _gelu(y @ w0 + b0) @ w1 + b1}
    for s, name in zip("qkv", ("query", "key", "value")):
      e["w" + s] = g(f"{mha}/{name}/kernel").reshape(D, D)
      e["b" + s] = g(f"{mha}/{name}/bias").reshape(D)
    blocks.append(e)
  return {"patch_kernel": flat[pre + "embedding/kernel"],
          "patch_bias": flat[pre + "embedding/bias"],
          "cls": cls, "reg": np.zeros((0, D)), "patch_pos": patch_pos, "blocks": blocks,
          "norm": (flat[pre + "Transformer/encoder_norm/scale"],
                   flat[pre + "Transformer/encoder_norm/bias"])}


def _canon_from_torch_layout(sd):
  """timm (ViT / DINOv2) and facebookresearch DINOv2 (plain or block-chunked) state dicts."""
  prefixes = {int(m.group(2)): m.group(1) for k in sd
              if (m := re.fullmatch(r"(blocks\.(?:\d+\.)?(\d+)\.)norm1\.weight", k))}
  assert sorted(prefixes) == list(range(DEPTH)), sorted(prefixes)
  cls, patch_pos = _split_pos(sd["cls_token"][0, 0], sd["pos_embed"][0])
  reg = sd.get("reg_token", sd.get("register_tokens", np.zeros((1, 0, D))))[0]
  lin = lambda k: (sd[k + ".weight"].T, sd[k + ".bias"])  # noqa: E731
  blocks = []
  for i in range(DEPTH):
    p = prefixes[i]
    wq, wk, wv = np.split(sd[p + "attn.qkv.weight"], 3, 0)
    bq, bk, bv = np.split(sd[p + "attn.qkv.bias"], 3, 0)
    fc1, fc2 = ("mlp.fc1", "mlp.fc2") if p + "mlp.fc1.weight" in sd else ("mlp.w12", "mlp.w3")
    (w0, b0), (w1, b1) = lin(p + fc1), lin(p + fc2)
    if w0.shape[1] == 2 * w1.shape[0]:  # SwiGLU: [x1 (silu gate); x2]
      mlp = lambda y, w0=w0, b0=b0, w1=w1, b1=b1: (  # noqa: E731
          (lambda h: _silu(h[..., :h.shape[-1] // 2]) * h[..., h.shape[-1] // 2:])(y @ w0 + b0)
          @ w1 + b1)
    else:
      mlp = lambda y, w0=w0, b0=b0, w1=w1, b1=b1: _gelu(y @ w0 + b0) @ w1 + b1  # noqa: E731
    wo, bo = lin(p + "attn.proj")
    blocks.append({"ln1": lin(p + "norm1"), "ln2": lin(p + "norm2"), "wq": wq.T, "wk": wk.T,
                   "wv": wv.T, "bq": bq, "bk": bk, "bv": bv, "wo": wo, "bo": bo, "mlp": mlp,
                   "ls1": sd.get(p + "ls1.gamma", 1), "ls2": sd.get(p + "ls2.gamma", 1)})
  return {"patch_kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
          "patch_bias": sd["patch_embed.proj.bias"], "cls": cls, "reg": reg,
          "patch_pos": patch_pos, "blocks": blocks, "norm": lin("norm")}


# ----------------------------------------------------------------------------------------------
# Tests


def test_reads_the_saved_file_layout(models):
  vit_sd, dino_sd, swiglu_sd = (models[k][1] for k in ("vit", "dinov2", "dinov2_swiglu"))
  for k in ("encoder.layer.0.attention.attention.query.weight",
            "encoder.layer.1.output.dense.bias", "embeddings.patch_embeddings.projection.weight",
            "layernorm.weight", "pooler.dense.bias"):
    assert k in vit_sd, k
  assert "encoder.layer.0.layer_scale2.lambda1" in dino_sd and "embeddings.mask_token" in dino_sd
  hidden = swiglu_sd["encoder.layer.0.mlp.weights_out.weight"].shape[1]
  assert swiglu_sd["encoder.layer.0.mlp.weights_in.weight"].shape == (2 * hidden, D)
  assert "embeddings.register_tokens" in models["dinov2_reg"][1]
  with pytest.raises(KeyError, match="save_pretrained"):  # the in-memory 5.x names are refused
    cw.timm_from_hf_vit({k: v.numpy() for k, v in models["vit"][0].state_dict().items()})
  with pytest.raises(KeyError, match="save_pretrained"):
    cw.timm_from_hf_dinov2({k: v.numpy() for k, v in models["dinov2"][0].state_dict().items()})


@pytest.mark.parametrize("flavour", cw.AUGREG_FLAVOURS)
def test_augreg_npz(models, image, flavour):
  model, sd, eps = models["vit"]
  flat = cw.augreg_npz_from_hf_vit(sd, flavour=flavour, num_heads=HEADS)
  pre = {"params": "params/", "params_img_posemb": "params/img/"}.get(flavour, "")
  assert all(k.startswith(pre) for k in flat)
  mha = "MultiHeadDotProductAttention_" + ("1" if flavour == "prelinen" else "0")
  blk0 = (lambda k: flat[f"Transformer/encoderblock/{k}"][0]) if flavour == "stacked" else \
      (lambda k: flat[f"{pre}Transformer/encoderblock_0/{k}"])
  assert blk0(f"{mha}/query/kernel").shape == (D, HEADS, HD)
  assert blk0(f"{mha}/query/bias").shape == (HEADS, HD)
  assert blk0(f"{mha}/out/kernel").shape == (HEADS, HD, D)
  assert flat[pre + "head/kernel"].shape == (D, cw.NUM_HEAD_CLASSES)
  assert pre + "pre_logits/kernel" in flat
  if flavour == "stacked":
    assert all(v.shape[0] == DEPTH for k, v in flat.items() if "encoderblock/" in k)
    assert not any("encoderblock_" in k for k in flat)
  if flavour == "params_img_posemb":
    assert flat["params/img/pos_embedding"].shape == (1, N, D)
    assert not any("posembed_input" in k for k in flat)
    emb = model.embeddings
    np.testing.assert_allclose(flat["params/img/cls"],
                               (emb.cls_token + emb.position_embeddings[:, :1]).detach().numpy())
  else:
    assert flat[pre + "Transformer/posembed_input/pos_embedding"].shape == (1, 1 + N, D)

  # Block 0's q projection of random tokens: einsum with the (D, heads, hd) kernel vs HF Linear.
  x = np.random.default_rng(1).normal(size=(5, D)).astype(np.float32)
  q_npz = np.einsum("nd,dhk->nhk", x, blk0(f"{mha}/query/kernel")) + blk0(f"{mha}/query/bias")
  with torch.no_grad():
    q_hf = _hf_query(model)(torch.from_numpy(x)).numpy().reshape(5, HEADS, HD)
  np.testing.assert_allclose(q_npz, q_hf, atol=1e-5)
  # Patch embedding: (p,p,3,D) kernel applied patch by patch vs HF's Conv2d.
  k = flat[pre + "embedding/kernel"]
  assert k.shape == (PATCH, PATCH, 3, D)
  patch = image[0, :, PATCH:2 * PATCH, 3 * PATCH:4 * PATCH]  # grid cell (1, 3)
  with torch.no_grad():
    conv = model.embeddings.patch_embeddings.projection(torch.from_numpy(image[:1])).numpy()
  np.testing.assert_allclose(np.einsum("cpq,pqcd->d", patch, k) + flat[pre + "embedding/bias"],
                             conv[0, :, 1, 3], atol=1e-4)

  np.testing.assert_allclose(_forward(_canon_from_npz(flat, flavour), image, eps),
                             _hf_out(model, image), atol=ATOL)


def test_timm_vit(models, image):
  model, sd, eps = models["vit"]
  t = cw.timm_from_hf_vit(sd)
  assert t["pos_embed"].shape == (1, 1 + N, D)
  assert t["head.weight"].shape == (cw.NUM_HEAD_CLASSES, D)
  q, k, v = np.split(t["blocks.1.attn.qkv.weight"], 3)
  att = _module(model, "layers.1.attention", "encoder.layer.1.attention.attention")
  for got, name in zip((q, k, v), ("q_proj", "k_proj", "v_proj")):
    mod = getattr(att, name, None) or getattr(att, {"q_proj": "query", "k_proj": "key",
                                                    "v_proj": "value"}[name])
    np.testing.assert_array_equal(got, mod.weight.detach().numpy())
  t.pop("head.weight"), t.pop("head.bias")
  np.testing.assert_allclose(_forward(_canon_from_torch_layout(t), image, eps),
                             _hf_out(model, image), atol=ATOL)


@pytest.mark.parametrize("name", ["dinov2", "dinov2_swiglu", "dinov2_reg"])
def test_timm_dinov2(models, image, name):
  model, sd, eps = models[name]
  t = cw.timm_from_hf_dinov2(sd, head=False)
  assert "mask_token" not in t and not any(k.startswith("head") for k in t)
  att = model.encoder.layer[0].attention
  q, k, v = np.split(t["blocks.0.attn.qkv.bias"], 3)
  np.testing.assert_array_equal(k, _module(att, "k_proj", "attention.key").bias.detach().numpy())
  emb = model.embeddings
  if name == "dinov2_reg":
    assert t["pos_embed"].shape == (1, N, D) and t["reg_token"].shape == (1, 4, D)
    # cls_token + 0 (no position for the cls in timm's no_embed_class) == HF cls + pos[:, 0]
    np.testing.assert_allclose(t["cls_token"] + 0,
                               (emb.cls_token + emb.position_embeddings[:, :1]).detach().numpy())
    np.testing.assert_array_equal(t["reg_token"], emb.register_tokens.detach().numpy())
  else:
    assert t["pos_embed"].shape == (1, 1 + N, D) and "reg_token" not in t
    np.testing.assert_array_equal(t["cls_token"], emb.cls_token.detach().numpy())
  if name == "dinov2_swiglu":  # packed fc1 = [x1 (silu gate); x2]: out = fc2(silu(x1) * x2)
    x = np.random.default_rng(2).normal(size=(5, D)).astype(np.float32)
    h = x @ t["blocks.1.mlp.fc1.weight"].T + t["blocks.1.mlp.fc1.bias"]
    x1, x2 = np.split(h, 2, -1)
    ours = (_silu(x1) * x2) @ t["blocks.1.mlp.fc2.weight"].T + t["blocks.1.mlp.fc2.bias"]
    with torch.no_grad():
      ref = model.encoder.layer[1].mlp(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)
  np.testing.assert_allclose(_forward(_canon_from_torch_layout(t), image, eps),
                             _hf_out(model, image), atol=ATOL)


@pytest.mark.parametrize("name,chunks", [("dinov2", 0), ("dinov2_swiglu", 2), ("dinov2_reg", 1)])
def test_dinov2_original(models, image, name, chunks):
  model, sd, eps = models[name]
  o = cw.dinov2_from_hf_dinov2(sd, chunks=chunks)
  assert o["mask_token"].shape == (1, D) and o["pos_embed"].shape == (1, 1 + N, D)
  assert ("register_tokens" in o) == (name == "dinov2_reg")
  assert any(".mlp.w12." in k for k in o) == (name == "dinov2_swiglu")
  idx = sorted({tuple(map(int, m.groups())) for k in o
                if (m := re.match(r"blocks\.(\d+)\.(\d+)\.", k))})
  if chunks:  # every global block index once, in `chunks` equal consecutive chunks
    assert [i for _, i in idx] == list(range(DEPTH))
    assert [c for c, _ in idx] == [i // (DEPTH // chunks) for i in range(DEPTH)]
  else:
    assert not idx and all(f"blocks.{i}.norm1.weight" in o for i in range(DEPTH))
  with pytest.raises(ValueError):
    cw.dinov2_from_hf_dinov2(sd, chunks=3)
  o.pop("mask_token")
  np.testing.assert_allclose(_forward(_canon_from_torch_layout(o), image, eps),
                             _hf_out(model, image), atol=ATOL)


def test_save_helpers(models, tmp_path):
  sd = models["vit"][1]
  flat = cw.augreg_npz_from_hf_vit(sd, flavour="prelinen", num_heads=HEADS)
  cw.save_npz(tmp_path / "a.npz", flat)
  with np.load(tmp_path / "a.npz") as z:
    assert set(z.files) == set(flat)
    np.testing.assert_array_equal(z["Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"],
                                  flat["Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"])
  t = cw.timm_from_hf_vit(sd)
  cw.save_torch(tmp_path / "t.pth", t)
  cw.save_torch(tmp_path / "w.pth", t, wrap="state_dict")
  loaded = torch.load(tmp_path / "t.pth", weights_only=True)
  wrapped = torch.load(tmp_path / "w.pth", weights_only=True)
  assert set(loaded) == set(t) and set(wrapped) == {"state_dict"}
  np.testing.assert_array_equal(wrapped["state_dict"]["pos_embed"].numpy(), t["pos_embed"])
  cw.save_safetensors(tmp_path / "t.safetensors", t)
  from safetensors.numpy import load_file
  np.testing.assert_array_equal(load_file(tmp_path / "t.safetensors")["cls_token"], t["cls_token"])
  cw.save_pickle_with_object(tmp_path / "p.pth", t)
  with pytest.raises(pickle.UnpicklingError):
    torch.load(tmp_path / "p.pth", weights_only=True)
  full = torch.load(tmp_path / "p.pth", weights_only=False)
  assert type(full["meta"]).__name__ == "CheckpointMeta" and set(full["state_dict"]) == set(t)


def test_no_library_imports():
  for f in (pathlib.Path(cw.__file__), pathlib.Path(__file__)):
    for node in ast.walk(ast.parse(f.read_text())):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      assert not any(n.split(".")[0] == "segvit_jax" for n in names), (f, names)
