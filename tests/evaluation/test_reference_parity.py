"""The one inference path (`Bundle.predict`, predict.py) against each family's reference
implementation run as its authors run it, on uint8 images of sizes that are and are not
multiples of the patch size / of 32, square and not.

What is compared (ours: `load_bundle(path).predict(images, protocol=...)`, float32, (B, C, H, W);
references: float64 torch on the same float32 weights, so the differences are our rounding):

- SegFormer (a tiny transformers SegformerForSemanticSegmentation, converted with
  `--from hf-segformer`), protocol "whole": transformers' logits of the unpadded normalised
  image, bilinearly upsampled (align_corners=False) to (H, W). Sizes 64x64, 60x76, 48x80,
  50x50. A 32-multiple padding (pad, run, crop) differs from it by far more than the tolerance
  at the other sizes: the reference tells the rules apart.
- SegViT (tests/torch_reference.py `SegViT`, weights from our random parameters, written with
  `save_bundle`), protocol "whole": the normalised image zero-padded bottom / right to a
  multiple of the patch (16; mmseg's ViT PatchEmbed padding="corner"), the scores at the
  padded size bilinearly resized (stretched, not cropped) to (H, W) (mmseg's encode_decode).
  Sizes 64x64, 60x76, 48x80, 50x50. With no "eval" recorded, protocol "model" is the same.
- SegViT-Shrunk (`SegViTShrunk`): the same rule with a multiple of 2 x patch (32). Sizes
  64x64, 48x80, 50x50.
- EoMT (a tiny transformers EomtForUniversalSegmentation, image_size 64 (fixed position
  embeddings), converted with `--from hf-eomt`), protocol "whole": the uint8 image padded with
  black bottom / right to 64x64, mask logits upsampled to 64x64, semantic scores (softmax of
  the classes without no-object x sigmoid of the masks, summed over queries), cropped to
  (H, W) (EoMT's revert of resize-and-pad). Sizes 64x64, 60x64, 52x60.
- EoMT, protocol "model" with the bundle's config.json "eval" set to EoMT's semantic protocol
  (short-side resize to 64, spread windows of 64, one scale, no flip, scores averaged):
  `resize_for_test`, EoMT's spread windows (`inference.spread_starts`), transformers per
  window, semantic scores per window, overlaps averaged, bilinear resize to the original size.
  Sizes 64x100 (two overlapping windows, no resize) and 90x70 (resized to 82x64, two windows).
- predict.py --save_scores --protocol whole on the SegFormer bundle and a folder of three
  images (60x76, 50x50, 64x64): NAME.npy equals the reference, NAME.png is its argmax.

Tolerance: 1e-4 max abs difference everywhere, argmax equal everywhere. Measured (CPU, x86,
float32 vs float64, the engine of "every window and the whole image padded by the model
family's reference rule"; see each test): 1.0e-6 to 6.2e-6 (max |score| 1.3 - 3.2); the rules
each test rejects differ from its reference by 6.5e-2 to 2.9 at the sizes where they differ.
Time on 2 shared CPU cores: about 40 s with a warm compilation cache, 115 s cold.
"""

from __future__ import annotations

import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image

from configs import common
import segvit_jax
from segvit_jax import bundle
from segvit_jax.data import transforms
from segvit_jax.evaluation import inference
from segvit_jax.models import build_model

from tests import support
from tests import torch_reference as ref

TOL = 1e-4  # float32 ours vs float64 references
SEPARATES = 1e-3  # at least this far apart: the padding rules a test tells apart
IMAGENET = ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))  # the converters' default
BATCH = 2  # images per size in the whole-image comparisons
NUM_CLASSES = 5

# ----------------------------------------------------------------------------------------------
# The models (tiny: the module runs on 2 CPU cores in about a minute and a half).

SEGFORMER = dict(num_labels=NUM_CLASSES, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1],
                 num_attention_heads=[1, 2, 2, 4], decoder_hidden_size=32)
SEGFORMER_SIZES = [(64, 64), (60, 76), (48, 80), (50, 50)]

PATCH = 16
SEGVIT = {
    "name": "segvit", "num_classes": NUM_CLASSES, "dtype": "float32",
    "backbone": {"variant": "Ti/16", "depth": 3, "width": 32, "num_heads": 2, "mlp_dim": 64,
                 "posemb_grid": (4, 4), "cls_in_blocks": False, "drop_path": 0.0},
    "head": {"tap_layers": (0, 1, 2), "width": 32, "num_heads": 2, "layers_per_stage": 1,
             "dropout": 0.0},
}
SHRUNK = {
    "name": "segvit", "num_classes": NUM_CLASSES, "dtype": "float32",
    "backbone": {"variant": "Ti/16", "depth": 4, "width": 32, "num_heads": 2, "mlp_dim": 64,
                 "posemb_grid": (4, 4), "cls_in_blocks": False, "drop_path": 0.0,
                 "shrink_idx": 2},
    "head": {"type": "shrunk", "tap_layers": (1, 3), "width": 32, "num_heads": 2,
             "query_grid": (4, 4), "qu_layers": 1, "atm_layers": 2, "dropout": 0.0},
}
# (the ViT and Shrunk divisors 16 and 32)
VIT_SIZES = {"segvit": [(64, 64), (60, 76), (48, 80), (50, 50)],
             "shrunk": [(64, 64), (48, 80), (50, 50)]}
VIT_MEAN_STD = ((127.0, 120.0, 110.0), (60.0, 58.0, 62.0))

EOMT_IMAGE = 64  # transformers' EoMT has fixed position embeddings: every input is 64x64
EOMT = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_blocks=1,
            num_queries=8, num_labels=NUM_CLASSES, image_size=EOMT_IMAGE, patch_size=PATCH,
            num_register_tokens=2, layerscale_value=0.5)
EOMT_WHOLE_SIZES = [(64, 64), (60, 64), (52, 60)]
EOMT_SPREAD_SIZES = [(64, 100), (90, 70)]
# EoMT's semantic test protocol at this model's size (EoMT App. A.3 "Image processing."), the
# bundle's config.json "eval" (the skeleton's other keys as they are).
EOMT_EVAL = dict(resize="short_side", scale=(EOMT_IMAGE, EOMT_IMAGE), scales=(1.0,),
                 flip=False, mode="spread", crop_size=(EOMT_IMAGE, EOMT_IMAGE),
                 average="scores")

PREDICT_SIZES = [(60, 76), (50, 50), (64, 64)]  # a subset of SEGFORMER_SIZES


# ----------------------------------------------------------------------------------------------
# Shared pieces.


def _uint8(size, batch: int = BATCH, seed: int = 0) -> np.ndarray:
  """(batch, h, w, 3) uint8: a random colour per 8x8 block plus noise. (Pure noise makes every
  16-px patch alike, and a random model then predicts one class everywhere.)"""
  h, w = size
  rng = np.random.default_rng(seed + 1000 * h + w)
  blocks = rng.uniform(0, 255, (batch, -(-h // 8), -(-w // 8), 3))
  image = np.repeat(np.repeat(blocks, 8, axis=1), 8, axis=2)[:, :h, :w]
  image = image + rng.uniform(-24, 24, image.shape)
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _normalised(images: np.ndarray, mean_std) -> torch.Tensor:
  """uint8 (B, H, W, 3) -> (B, 3, H, W) float64, (x - mean) / std."""
  mean, std = (torch.tensor(v, dtype=torch.float64)[:, None, None] for v in mean_std)
  x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).double()
  return (x - mean) / std


def _bilinear(x: torch.Tensor, size) -> torch.Tensor:
  return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _pad_bottom_right(x: torch.Tensor, multiple: int, value: float = 0.0) -> torch.Tensor:
  """(B, C, H, W) padded at the bottom / right to multiples of `multiple`."""
  h, w = x.shape[-2:]
  return F.pad(x, (0, -w % multiple, 0, -h % multiple), value=value)


def _eomt_scores(masks: torch.Tensor, classes: torch.Tensor, size) -> torch.Tensor:
  """transformers' post_process_semantic_segmentation before its resize: mask logits
  upsampled to `size`, einsum(softmax(class)[..., :-1], sigmoid(mask))."""
  probs = classes.softmax(-1)[..., :-1]
  return torch.einsum("bqc,bqhw->bchw", probs, _bilinear(masks, size).sigmoid())


def _predict(path: str, images: np.ndarray, protocol: str) -> np.ndarray:
  b = segvit_jax.load_bundle(path)
  with jax.default_matmul_precision("highest"):
    scores = b.predict(images, protocol=protocol)
  assert isinstance(scores, np.ndarray) and scores.dtype == np.float32, type(scores)
  return scores


def _check(got: np.ndarray, want: np.ndarray, what: str, argmax_varies: bool = False) -> float:
  """Max abs difference < TOL and every argmax equal, against a reference whose scores vary
  over the image (per class, std over pixels > 0.005); with `argmax_varies`, whose argmax is
  not one class everywhere. (The random ATM and EoMT models here give most pixels the same
  class: their queries' class distributions are alike. The scores still vary, and each test
  also shows the rule it rejects to differ by more than SEPARATES.)"""
  assert got.shape == want.shape, (what, got.shape, want.shape)
  assert want.std(axis=(-2, -1)).mean() > 0.005, what
  classes = len(np.unique(want.argmax(1)))
  assert classes > 1 or not argmax_varies, what
  diff = support.max_diff(got, want)
  agree = float(np.mean(got.argmax(1) == want.argmax(1)))
  print(f"{what}: max |score| {np.abs(want).max():.2f}, max abs diff {diff:.1e}, argmax "
        f"agreement {agree:.4f} ({classes} classes)")
  assert diff < TOL and agree == 1.0, (what, diff, agree)
  return diff


# ----------------------------------------------------------------------------------------------
# References: every torch computation runs first, in one fixture (on 2 CPU cores, torch calls
# made after JAX ones ran several times slower here), then the bundles are written.


def _segformer_reference(root) -> dict:
  labels = {i: f"class_{i}" for i in range(NUM_CLASSES)}
  torch.manual_seed(0)
  config = transformers.SegformerConfig(**SEGFORMER, id2label=labels,
                                        label2id={v: k for k, v in labels.items()})
  hf = transformers.SegformerForSemanticSegmentation(config).eval()
  ref.randomize_module_(hf, seed=1)  # every parameter and the BatchNorm statistics
  hf.save_pretrained(root / "hf")
  hf = hf.double()
  want, padded32 = {}, {}
  with torch.no_grad():
    for size in SEGFORMER_SIZES:
      x = _normalised(_uint8(size), IMAGENET)
      want[size] = _bilinear(hf(pixel_values=x).logits, size).numpy()
      # The rule it replaces: zero-padded (normalised) to multiples of 32, run, cropped.
      xp = _pad_bottom_right(x, 32)
      padded32[size] = _bilinear(hf(pixel_values=xp).logits, xp.shape[-2:])[
          ..., :size[0], :size[1]].numpy()
  return dict(hf_dir=root / "hf", want=want, padded32=padded32)


def _vit_reference(kind: str) -> dict:
  """Our random parameters, the reference with them, its outputs by the mmseg rule (pad the
  normalised image, run, resize the padded scores to (H, W)) and the cropping rule."""
  cfg = SEGVIT if kind == "segvit" else SHRUNK
  model = build_model(cfg)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  params = ref.randomize_params(flax.linen.meta.unbox(abstract)["params"], seed=3, gain=1.5)
  bb, head = cfg["backbone"], dict(cfg["head"])
  backbone = dict(width=bb["width"], depth=bb["depth"], mlp_dim=bb["mlp_dim"],
                  num_heads=bb["num_heads"], patch_size=PATCH, posemb_grid=bb["posemb_grid"])
  if kind == "shrunk":
    head.pop("type")
    tmodel = ref.SegViTShrunk(NUM_CLASSES, dict(backbone, shrink_idx=bb["shrink_idx"]), head)
    ref.load_segvit_shrunk_from_flax(tmodel, params)
    divisor = 2 * PATCH
  else:
    tmodel = ref.SegViT(NUM_CLASSES, dict(backbone, cls_token=True, cls_in_blocks=False,
                                          final_norm=False), head)
    ref.load_segvit_from_flax(tmodel, params)
    divisor = PATCH
  tmodel = tmodel.double().eval()
  want, cropped = {}, {}
  with torch.no_grad():
    for size in VIT_SIZES[kind]:
      x = _pad_bottom_right(_normalised(_uint8(size), VIT_MEAN_STD), divisor)
      scores = tmodel(x)["semantic_scores"]  # at the padded size
      want[size] = _bilinear(scores, size).numpy()
      cropped[size] = scores[..., :size[0], :size[1]].numpy()
  return dict(kind=kind, cfg=cfg, params=params, want=want, cropped=cropped)


def _eomt_reference(root) -> dict:
  labels = {i: f"class_{i}" for i in range(NUM_CLASSES)}
  config = transformers.EomtConfig(**EOMT, id2label=labels,
                                   label2id={v: k for k, v in labels.items()})
  config._attn_implementation = "eager"  # the plain softmax(q k^T) v
  torch.manual_seed(0)
  hf = transformers.EomtForUniversalSegmentation(config).eval()
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in hf.named_parameters():  # tests/models/test_eomt_vs_hf.py's randomisation
      z = torch.randn(p.shape, generator=g, dtype=p.dtype)
      if name.endswith("lambda1"):
        p.copy_(0.5 + 0.1 * z)
      elif name.endswith(("cls_token", "register_tokens", "position_embeddings.weight",
                          "query.weight")):
        p.copy_(z)
      elif p.ndim > 1:
        p.copy_(z / np.sqrt(np.prod(p.shape[1:])))
      elif name.endswith("weight"):
        p.copy_(1.0 + 0.2 * z)
      else:
        p.copy_(0.2 * z)
    hf.attn_mask_probs.zero_()  # annealed: no masked attention at inference
  hf.save_pretrained(root / "hf")
  hf = hf.double()

  def scores(x: torch.Tensor) -> torch.Tensor:
    assert x.shape[-2:] == (EOMT_IMAGE, EOMT_IMAGE), x.shape
    out = hf(pixel_values=x)
    return _eomt_scores(out.masks_queries_logits, out.class_queries_logits, x.shape[-2:])

  whole, stretched = {}, {}
  with torch.no_grad():
    for size in EOMT_WHOLE_SIZES:
      images = _uint8(size)
      black = np.zeros((BATCH, EOMT_IMAGE, EOMT_IMAGE, 3), np.uint8)
      black[:, :size[0], :size[1]] = images  # EoMT pads the uint8 image
      s = scores(_normalised(black, IMAGENET))
      whole[size] = s[..., :size[0], :size[1]].numpy()
      stretched[size] = _bilinear(s, size).numpy()  # the ViT rule, which EoMT does not run

    spread, windows = {}, {}
    for size in EOMT_SPREAD_SIZES:
      image = _uint8(size, batch=1)[0]
      resized = transforms.resize_for_test(image, "short_side", (EOMT_IMAGE, EOMT_IMAGE),
                                           ratio=1.0, size_divisor=32, min_size=0)
      h, w = resized.shape[:2]
      starts = [(y, x) for y in inference.spread_starts(h, EOMT_IMAGE)
                for x in inference.spread_starts(w, EOMT_IMAGE)]
      x = _normalised(resized[None], IMAGENET)
      crops = torch.cat([x[..., y:y + EOMT_IMAGE, x0:x0 + EOMT_IMAGE] for y, x0 in starts])
      s = scores(crops)
      acc = torch.zeros((1, NUM_CLASSES, h, w), dtype=torch.float64)
      count = torch.zeros((h, w), dtype=torch.float64)
      for k, (y, x0) in enumerate(starts):
        acc[..., y:y + EOMT_IMAGE, x0:x0 + EOMT_IMAGE] += s[k]
        count[y:y + EOMT_IMAGE, x0:x0 + EOMT_IMAGE] += 1
      assert count.min() >= 1
      spread[size] = _bilinear(acc / count, size).numpy()
      windows[size] = ((h, w), starts)
  return dict(hf_dir=root / "hf", whole=whole, stretched=stretched, spread=spread,
              windows=windows)


@pytest.fixture(scope="module")
def refs(tmp_path_factory) -> dict:
  root = tmp_path_factory.mktemp("parity")
  (root / "segformer").mkdir()
  (root / "eomt").mkdir()
  # One torch thread: these models are tiny, and on a shared 2-core machine torch's thread
  # pool waiting for the busy second core made each call 10-50x slower here.
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  try:
    out = {"segformer": _segformer_reference(root / "segformer"),
           "eomt": _eomt_reference(root / "eomt"),
           **{kind: _vit_reference(kind) for kind in VIT_SIZES}}
  finally:
    torch.set_num_threads(threads)
  out["root"] = root
  return out


@pytest.fixture(scope="module")
def segformer(refs) -> dict:
  r = refs["segformer"]
  path = refs["root"] / "segformer" / "bundle"
  assert support.convert_cli(r["hf_dir"], path, "--from", "hf-segformer") == 0
  meta = bundle.read_config(str(path))
  assert [tuple(meta["mean"]), tuple(meta["std"])] == list(IMAGENET)  # the references' too
  return dict(r, bundle=str(path))


@pytest.fixture(scope="module")
def eomt(refs) -> dict:
  """The converted EoMT bundle with EoMT's semantic protocol recorded in its config.json."""
  r = refs["eomt"]
  path = refs["root"] / "eomt" / "bundle"
  assert support.convert_cli(r["hf_dir"], path, "--from", "hf-eomt") == 0
  meta = bundle.read_config(str(path))
  assert [tuple(meta["mean"]), tuple(meta["std"])] == list(IMAGENET)
  ev = common.run_config().eval.to_dict()
  ev.update(EOMT_EVAL)
  meta["eval"] = {k: list(v) if isinstance(v, tuple) else v for k, v in ev.items()}
  (path / "config.json").write_text(json.dumps(meta, indent=2))
  return dict(r, bundle=str(path))


@pytest.fixture(scope="module", params=sorted(VIT_SIZES))
def vit(request, refs) -> dict:
  r = refs[request.param]
  path = bundle.save_bundle(str(refs["root"] / f"{r['kind']}_bundle"), r["params"], r["cfg"],
                            mean=VIT_MEAN_STD[0], std=VIT_MEAN_STD[1],
                            class_names=[f"class_{i}" for i in range(NUM_CLASSES)])
  assert "eval" not in bundle.read_config(path)
  return dict(r, bundle=path)


# ----------------------------------------------------------------------------------------------
# SegFormer: no padding.


def test_segformer_whole_is_transformers_upsampled_logits_at_every_size(segformer):
  for size in SEGFORMER_SIZES:
    want = segformer["want"][size]
    rejected = support.max_diff(segformer["padded32"][size], want)
    print(f"segformer {size}: the 32-padding rule differs by {rejected:.1e}")
    if size[0] % 32 or size[1] % 32:  # the 32-padding rule is far off here
      assert rejected > SEPARATES, size
    else:
      assert rejected < 1e-9, size
    got = _predict(segformer["bundle"], _uint8(size), "whole")
    _check(got, want, f"segformer whole {size}", argmax_varies=True)
  # Measured (CPU, x86, float32 vs float64): max abs diff 1.0e-6 - 1.5e-6 (max |score|
  # 2.2 - 3.0), 4-5 classes in each argmax; the 32-padding rule differs from the reference by
  # 1.4 / 1.6 / 2.0 at 60x76 / 48x80 / 50x50 (the engine before this contract: 1.4 at 60x76,
  # argmax agreement 0.62).


# ----------------------------------------------------------------------------------------------
# SegViT and SegViT-Shrunk: the normalised image zero-padded, the padded scores stretched.


def test_vit_whole_pads_normalised_image_and_stretches_scores(vit):
  divisor = 2 * PATCH if vit["kind"] == "shrunk" else PATCH
  for size in VIT_SIZES[vit["kind"]]:
    want = vit["want"][size]
    rejected = support.max_diff(vit["cropped"][size], want)
    print(f"{vit['kind']} {size}: cropping instead of stretching differs by {rejected:.1e}")
    if size[0] % divisor or size[1] % divisor:  # stretching is not cropping here
      assert rejected > SEPARATES, size
    got = _predict(vit["bundle"], _uint8(size), "whole")
    _check(got, want, f"{vit['kind']} whole {size}")
  # Measured (CPU, x86, float32 vs float64): segvit <= 6.2e-6 (max |score| 3.2), shrunk
  # <= 3.7e-6 (2.2); cropping instead of stretching differs by 0.71 (segvit 60x76), 2.9
  # (segvit 50x50), 0.065 (shrunk 48x80), 0.081 (shrunk 50x50), and by 0 where the sides are
  # multiples of the divisor.


def test_bundle_without_recorded_protocol_predicts_whole(vit):
  size = VIT_SIZES[vit["kind"]][1]  # not a multiple of the divisor
  images = _uint8(size)
  model = _predict(vit["bundle"], images, "model")
  np.testing.assert_array_equal(model, _predict(vit["bundle"], images, "whole"))
  _check(model, vit["want"][size], f"{vit['kind']} model (no eval recorded) {size}")


# ----------------------------------------------------------------------------------------------
# EoMT: black uint8 padding, scores cropped; the recorded spread-window protocol.


def test_eomt_whole_pads_black_and_crops_scores(eomt):
  for size in EOMT_WHOLE_SIZES:
    want = eomt["whole"][size]
    rejected = support.max_diff(eomt["stretched"][size], want)
    print(f"eomt {size}: stretching instead of cropping differs by {rejected:.1e}")
    if size != (EOMT_IMAGE, EOMT_IMAGE):  # cropping is not stretching here
      assert rejected > SEPARATES, size
    got = _predict(eomt["bundle"], _uint8(size), "whole")
    _check(got, want, f"eomt whole {size}")
  # Measured (CPU, x86, float32 vs float64): <= 1.5e-6 (max |score| 2.6); stretching instead
  # of cropping differs by 2.0 at 60x64 and 52x60 (the engine before this contract, padding
  # the normalised image with 0: 1.1 at 60x64).


def test_eomt_recorded_protocol_is_spread_windows_of_the_resized_image(eomt):
  # The layouts the reference cut: two windows each, overlapping.
  assert eomt["windows"][(64, 100)] == ((64, 100), [(0, 0), (0, 36)])
  assert eomt["windows"][(90, 70)] == ((82, 64), [(0, 0), (18, 0)])
  for size in EOMT_SPREAD_SIZES:
    got = _predict(eomt["bundle"], _uint8(size, batch=1), "model")
    _check(got, eomt["spread"][size], f"eomt model (spread) {size}")
  # Measured (CPU, x86, float32 vs float64): 1.3e-6 and 1.7e-6 (max |score| 2.5 / 2.1); the
  # engine before this contract (the whole image only) differs by 1.9 at 64x100.


# ----------------------------------------------------------------------------------------------
# predict.py writes what Bundle.predict gives.


def test_predict_save_scores_equals_reference(segformer, tmp_path):
  images, out = tmp_path / "images", tmp_path / "out"
  images.mkdir()
  names = {}
  for size in PREDICT_SIZES:
    name = f"image_{size[0]}x{size[1]}"
    Image.fromarray(_uint8(size)[0]).save(images / f"{name}.png")  # lossless
    names[name] = size
  proc = support.run(os.path.join(support.ROOT, "predict.py"), "--checkpoint",
                     segformer["bundle"], "--input", str(images), "--output", str(out),
                     "--save_scores", "--protocol", "whole")
  assert proc.returncode == 0
  for name, size in names.items():
    scores = np.load(out / f"{name}.npy")
    assert scores.dtype == np.float32 and scores.shape == (NUM_CLASSES, *size)
    want = segformer["want"][size][:1]
    _check(scores[None], want, f"predict.py {name}", argmax_varies=True)
    np.testing.assert_array_equal(np.asarray(Image.open(out / f"{name}.png")),
                                  scores.argmax(0))
