"""SegViT (ViT + ATM head) and the ATM loss against the independent PyTorch reference in
tests/torch_reference.py, with identical (randomised) weights, in eval mode.

The reference runs in float64, so the differences below are the Flax float32 rounding error.
JAX matmuls use "highest" precision (a no-op on CPU; on GPU/TPU the default would use
TF32/bf16 passes, which these 1e-5 bounds are not meant for).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from segvit_jax.losses.atm import atm_loss
from segvit_jax.models import build_model

from tests import torch_reference as ref

NUM_CLASSES = 5
CFG = {
    "name": "segvit", "num_classes": NUM_CLASSES, "dtype": "float32",
    "backbone": {"variant": "Ti/8", "depth": 4, "width": 64, "num_heads": 4, "mlp_dim": 128,
                 "posemb_grid": (6, 6), "cls_in_blocks": False, "drop_path": 0.0,
                 "remat": False},
    "head": {"tap_layers": (1, 2, 3), "width": 32, "num_heads": 4, "layers_per_stage": 2,
             "dropout": 0.1},
}
# Non-square, and not the stored 6x6 position-embedding grid: the grid is 6 x 8.
IMAGE_SHAPE = (2, 48, 64, 3)
TOL = 1e-5
# The ATM loss options of the SegViT configs (config.loss; the reference's defaults).
ATM_LOSS = dict(ce_weight=1.0, no_object_weight=0.1, focal_weight=20.0, focal_alpha=0.25,
                focal_gamma=2.0, dice_weight=1.0, ignore_index=255)


def _maxdiff(a, b) -> float:
  a = np.asarray(a, np.float64)
  b = b.detach().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)))


def _nchw(images: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(images).permute(0, 3, 1, 2).double()


def _key(ignore_in_masks: bool) -> str:
  return "ignore_excluded" if ignore_in_masks else "ignore_negative"


def _captured(mdl, method_name) -> bool:
  """capture_intermediates filter: the backbone's and the ATM head's outputs."""
  return method_name == "__call__" and mdl.name in ("backbone", "head")


def _make_labels(seed: int = 0) -> np.ndarray:
  """(2, 48, 64) labels: blocky regions plus pixel noise; image 0 uses classes {0, 1, 3},
  image 1 uses {1, 2, 4} (so every class is absent from some image); about 15% ignore (255)."""
  rng = np.random.default_rng(seed)
  b, h, w, _ = IMAGE_SHAPE
  subsets = [np.array([0, 1, 3]), np.array([1, 2, 4])]
  labels = np.zeros((b, h, w), np.int32)
  for i in range(b):
    coarse = rng.choice(subsets[i], size=(h // 8, w // 8))
    fine = np.kron(coarse, np.ones((8, 8), np.int32))
    noise = rng.random((h, w)) < 0.1
    fine[noise] = rng.choice(subsets[i], size=noise.sum())
    fine[rng.random((h, w)) < 0.1] = 255
    fine[:, -5:] = 255  # an unlabelled band
    labels[i] = fine
  return labels


@pytest.fixture(scope="module")
def setup():
  """Everything the tests compare, from as few XLA compilations as possible (CPU compiles
  dominate the run time): one jit gives the outputs, the intermediates and the end-to-end
  parameter gradients of the loss; one jit gives the loss terms and output gradients for both
  settings of `ignore_in_masks`."""
  model = build_model(CFG)
  images = np.random.default_rng(1).standard_normal(IMAGE_SHAPE).astype(np.float32)
  labels = _make_labels()
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros(IMAGE_SHAPE))
  params = ref.randomize_params(nn.meta.unbox(abstract)["params"], seed=0)
  params = jax.tree_util.tree_map(jnp.asarray, params)

  def total_from_params(p):
    out, state = model.apply({"params": p}, images, train=False,
                             capture_intermediates=_captured)
    total, terms = atm_loss(out, labels, num_classes=NUM_CLASSES, ignore_in_masks=False,
                            **ATM_LOSS)
    return total, (out, state["intermediates"], terms)

  def losses_from_outputs(out):
    res = {}
    for ignore in (False, True):
      fn = lambda o: atm_loss(o, labels, num_classes=NUM_CLASSES,  # noqa: B023, E731
                              ignore_in_masks=ignore, **ATM_LOSS)
      (_, terms), grads = jax.value_and_grad(fn, has_aux=True)(out)
      res[_key(ignore)] = (terms, grads)
    all_ignore = jnp.full(IMAGE_SHAPE[:3], 255, jnp.int32)
    res["all_ignore"] = atm_loss(out, all_ignore, num_classes=NUM_CLASSES,
                                 ignore_in_masks=False, **ATM_LOSS)[1]
    return res

  with jax.default_matmul_precision("highest"):
    (_, (out, inter, _)), g_par = jax.jit(
        jax.value_and_grad(total_from_params, has_aux=True))(params)
    out = {k: out[k] for k in ("class_logits", "mask_logits", "aux_outputs", "semantic_scores")}
    loss_out = {k: out[k] for k in ("class_logits", "mask_logits", "aux_outputs")}
    jax_losses = jax.jit(losses_from_outputs)(loss_out)
  (_, aux), = inter["backbone"]["__call__"]
  taps = [aux["blocks"][i] for i in sorted(CFG["head"]["tap_layers"], reverse=True)]
  (stages,) = inter["head"]["__call__"]

  bb = CFG["backbone"]
  tmodel = ref.SegViT(
      NUM_CLASSES,
      backbone=dict(width=bb["width"], depth=bb["depth"], mlp_dim=bb["mlp_dim"],
                    num_heads=bb["num_heads"], patch_size=8, posemb_grid=bb["posemb_grid"],
                    cls_token=True, cls_in_blocks=False, final_norm=False),
      head=dict(CFG["head"])).double().eval()
  ref.load_segvit_from_flax(tmodel, jax.tree_util.tree_map(np.asarray, params))
  with torch.no_grad():
    tout = tmodel(_nchw(images))
  return dict(params=params, images=images, labels=labels, out=out, taps=taps, stages=stages,
              g_par=g_par, jax_losses=jax_losses, tmodel=tmodel, tout=tout)


def _torch_outputs(out, requires_grad=False):
  """The JAX outputs as float64 torch tensors (leaves, optionally requiring grad)."""
  def t(a):
    return torch.from_numpy(np.asarray(a, np.float64)).requires_grad_(requires_grad)
  return {"class_logits": t(out["class_logits"]), "mask_logits": t(out["mask_logits"]),
          "aux_outputs": [{k: t(v) for k, v in a.items()} for a in out["aux_outputs"]]}


def test_forward_matches_reference(setup):
  out, taps, stages, tout = setup["out"], setup["taps"], setup["stages"], setup["tout"]
  # Guard against a vacuous comparison: the outputs must be of a useful size.
  assert np.abs(np.asarray(out["mask_logits"])).max() > 1.0
  assert np.asarray(out["semantic_scores"]).std() > 0.05

  diffs = {}
  for i, (a, b) in enumerate(zip(taps, tout["taps"], strict=True)):
    diffs[f"tap_{i}"] = _maxdiff(a, b)
  for s, (a, b) in enumerate(zip(stages, tout["stages"], strict=True)):
    diffs[f"stage_{s}_class_logits"] = _maxdiff(a["class_logits"], b["class_logits"])
    diffs[f"stage_{s}_mask_logits"] = _maxdiff(a["mask_logits"], b["mask_logits"])
  assert len(out["aux_outputs"]) == len(tout["aux_outputs"]) == 2
  for s, (a, b) in enumerate(zip(out["aux_outputs"], tout["aux_outputs"], strict=True)):
    diffs[f"aux_{s}_class_logits"] = _maxdiff(a["class_logits"], b["class_logits"])
    diffs[f"aux_{s}_mask_logits"] = _maxdiff(a["mask_logits"], b["mask_logits"])
  for k in ("class_logits", "mask_logits", "semantic_scores"):
    diffs[k] = _maxdiff(out[k], tout[k])
  print({k: f"{v:.2e}" for k, v in diffs.items()})
  # Measured (CPU, x86, float32 vs the float64 reference): taps <= 2.6e-6, class logits
  # <= 6.7e-7, per-stage mask logits <= 1.6e-6 (aux identical), final upsampled masks 1.4e-6,
  # semantic scores 9.4e-7.
  bad = {k: v for k, v in diffs.items() if not v < TOL}
  assert not bad, bad


@pytest.mark.parametrize("ignore_in_masks", [False, True])
def test_loss_matches_reference(setup, ignore_in_masks):
  terms, _ = setup["jax_losses"][_key(ignore_in_masks)]
  tlabels = torch.from_numpy(setup["labels"]).long()
  # The JAX outputs through the reference loss (checks the loss alone) ...
  _, tterms = ref.atm_loss(_torch_outputs(setup["out"]), tlabels, NUM_CLASSES,
                           ignore_in_masks=ignore_in_masks)
  # ... and the reference's own outputs through it (model + loss, end to end).
  _, tterms_e2e = ref.atm_loss(setup["tout"], tlabels, NUM_CLASSES,
                               ignore_in_masks=ignore_in_masks)

  names = [f"{n}{s}" for s in ("", "_0", "_1") for n in ("loss_ce", "loss_mask", "loss_dice")]
  assert sorted(terms) == sorted(tterms) == sorted(names)
  diffs = {n: abs(float(terms[n]) - float(tterms[n])) for n in names}
  diffs_e2e = {n: abs(float(terms[n]) - float(tterms_e2e[n])) for n in names}
  print({n: f"{float(terms[n]):.4f} d={diffs[n]:.1e} e2e={diffs_e2e[n]:.1e}" for n in names})
  # Measured: same inputs <= 6.2e-7 (terms of size 0.6 - 4.1); end to end <= 7.1e-7.
  for n in names:
    assert float(terms[n]) > 0.1, n
    assert diffs[n] < TOL, (n, diffs[n])
    assert diffs_e2e[n] < TOL, (n, diffs_e2e[n])


def test_loss_ignore_switch_changes_only_mask_terms(setup):
  a, _ = setup["jax_losses"][_key(False)]
  b, _ = setup["jax_losses"][_key(True)]
  for n in a:
    if n.startswith("loss_ce"):
      assert float(a[n]) == float(b[n]), n
    else:
      assert abs(float(a[n]) - float(b[n])) > 1e-3, n


def test_loss_all_ignore_has_no_mask_terms(setup):
  """No class present anywhere: the mask terms are 0 (divided by max(0, 1)) and every CE
  target is no-object, as in the reference."""
  labels = np.full(IMAGE_SHAPE[:3], 255, np.int32)
  terms = setup["jax_losses"]["all_ignore"]
  _, tterms = ref.atm_loss(_torch_outputs(setup["out"]), torch.from_numpy(labels).long(),
                           NUM_CLASSES)
  for n in terms:
    assert abs(float(terms[n]) - float(tterms[n])) < TOL, n
    if not n.startswith("loss_ce"):
      assert float(terms[n]) == 0.0, n


@pytest.mark.parametrize("ignore_in_masks", [False, True])
def test_loss_gradients_wrt_outputs_match_autograd(setup, ignore_in_masks):
  _, g_out = setup["jax_losses"][_key(ignore_in_masks)]
  tout = _torch_outputs(setup["out"], requires_grad=True)
  ref.atm_loss(tout, torch.from_numpy(setup["labels"]).long(), NUM_CLASSES,
               ignore_in_masks=ignore_in_masks)[0].backward()
  pairs = {"class_logits": (g_out["class_logits"], tout["class_logits"].grad),
           "mask_logits": (g_out["mask_logits"], tout["mask_logits"].grad)}
  for i, (ga, ta) in enumerate(zip(g_out["aux_outputs"], tout["aux_outputs"], strict=True)):
    pairs[f"aux_{i}_class_logits"] = (ga["class_logits"], ta["class_logits"].grad)
    pairs[f"aux_{i}_mask_logits"] = (ga["mask_logits"], ta["mask_logits"].grad)
  rel = _relative_diffs(pairs)
  print({k: f"{v:.1e}" for k, v in rel.items()})
  # Tolerance: max abs diff / max |grad| < 1e-5. Measured <= 1.6e-7.
  bad = {k: v for k, v in rel.items() if not v < 1e-5}
  assert not bad, bad


def test_loss_gradients_wrt_params_match_autograd(setup):
  """End to end (model + loss, ignore pixels as negatives): d(total loss) w.r.t. parameters
  of the head and the backbone against torch autograd through the reference model."""
  tmodel = setup["tmodel"]
  tmodel.zero_grad(set_to_none=True)
  ref.atm_loss(tmodel(_nchw(setup["images"])), torch.from_numpy(setup["labels"]).long(),
               NUM_CLASSES)[0].backward()
  head, bb = tmodel.head, tmodel.backbone
  gh, gb = setup["g_par"]["head"], setup["g_par"]["backbone"]
  xq = gh["decoder_0_layer_0"]["cross_attn"]["query"]["kernel"]
  sa_out = gh["decoder_1_layer_0"]["self_attn"]["out"]["kernel"]
  pairs = {
      "class_tokens": (gh["class_tokens"], head.class_tokens.weight.grad),
      "class_embed": (gh["class_embed"]["kernel"], head.class_embed.weight.grad.T),
      "input_proj_2": (gh["input_proj_2"]["kernel"], head.input_proj[2].weight.grad.T),
      "cross_attn_q": (np.reshape(xq, (xq.shape[0], -1)),
                       head.stages[0][0].cross_attn.q.weight.grad.T),
      "self_attn_out": (np.reshape(sa_out, (-1, sa_out.shape[-1])),
                        head.stages[1][0].self_attn.out_proj.weight.grad.T),
      "pos_embedding": (gb["pos_embedding"], bb.pos_embed.grad),
      "patch_kernel": (gb["embedding"]["kernel"], bb.patch_embed.weight.grad.permute(2, 3, 1, 0)),
  }
  rel = _relative_diffs(pairs)
  print({k: f"{v:.1e}" for k, v in rel.items()})
  # Tolerance: max abs diff / max |grad| < 1e-4. Measured <= 7e-7.
  bad = {k: v for k, v in rel.items() if not v < 1e-4}
  assert not bad, bad


def _relative_diffs(pairs):
  rel = {}
  for name, (a, b) in pairs.items():
    b = b.detach().numpy()
    scale = np.abs(b).max()
    assert scale > 0, name
    rel[name] = _maxdiff(a, b) / scale
  return rel
