"""Model families. `MODELS` maps a family to the module that implements it; a config's
`model.name` (and, for SegViT, `model.head.type`) picks the family (`family`), and
`build_model(config.model)` returns the Flax module it describes.

  vit            a ViT backbone alone (converted pretrained weights)      vit.py
  segvit         SegViT: ViT (or MiT) + ATM head                          segvit.py
  segvit_shrunk  SegViT-Shrunk: ViT with query down-sampling + QU head    shrunk.py
  segformer      SegFormer: MiT + all-MLP head                            segformer.py
  eomt           EoMT: DINOv2 ViT with queries in its last blocks         eomt.py

Every family module defines `from_config(model_cfg, dtype) -> nn.Module`,
`backbone_from_config(model_cfg, dtype) -> nn.Module` (its backbone alone, whose parameters are
the model's "backbone"; for "vit" the model itself), `input_divisor(model_cfg) -> int` (what
input sides must be multiples of) and, when its training-mode forward pass takes step-dependent
inputs, `training_inputs(model_cfg, step) -> dict`. Shared layers: layers.py, cpu_ops.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from segvit_jax.models import eomt, segformer, segvit, shrunk, vit

MODELS = {"vit": vit, "segvit": segvit, "segvit_shrunk": shrunk, "segformer": segformer,
          "eomt": eomt}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def family(model_cfg: Mapping[str, Any]) -> str:
  """The `MODELS` key of a `config.model`: its `name` (default "segvit"), "segvit_shrunk" for
  a SegViT with `head.type="shrunk"`."""
  name = model_cfg.get("name", "segvit")
  if name == "segvit" and (model_cfg.get("head") or {}).get("type") == "shrunk":
    return "segvit_shrunk"
  if name not in MODELS or name == "segvit_shrunk":
    raise ValueError(f"unknown model name {name!r}; known: 'eomt', 'segformer', 'segvit', "
                     "'vit'")
  return name


def _plain(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
  return dict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg)


def build_model(model_cfg: Mapping[str, Any]) -> nn.Module:
  """Builds the module a `config.model` describes (`family` selects the family)."""
  cfg = _plain(model_cfg)
  return MODELS[family(cfg)].from_config(cfg, DTYPES[cfg.get("dtype", "float32")])


def build_backbone(model_cfg: Mapping[str, Any]) -> nn.Module:
  """The backbone of the model a `config.model` describes, alone (for a "vit" config, the
  model itself); it runs on the whole model's params["backbone"]."""
  cfg = _plain(model_cfg)
  return MODELS[family(cfg)].backbone_from_config(cfg, DTYPES[cfg.get("dtype", "float32")])


def input_divisor(model_cfg: Mapping[str, Any]) -> int:
  """What input sides must be multiples of: the patch size, twice that with query
  down-sampling (the token grid is halved inside the backbone). A SegFormer takes any size;
  its 32 (the MiT's total stride) makes every stage grid an exact fraction of the input."""
  return MODELS[family(model_cfg)].input_divisor(model_cfg)


@dataclasses.dataclass(frozen=True)
class Padding:
  """How a family's reference takes an input whose sides are not multiples of what the model
  needs (`input_padding`): sides padded bottom / right to a `multiple`, with `fill` "zero" (0
  in normalised space) or "black" (uint8 0, before normalising); the padded input's scores
  `back` to the input by "resize" (bilinear, to the unpadded size) or "crop"."""
  multiple: int
  fill: str
  back: str


# family: (multiple of, fill, back). Whole-image inference, and every window of the test
# protocols, follow the reference's rule (README, "Evaluation and prediction"):
#   segvit         patch (32 on an MiT)  zero   resize  mmseg's ViT PatchEmbed(padding="corner")
#                                                       on the normalised image; encode_decode
#                                                       resizes the scores to the image
#   segvit_shrunk  2 x patch             zero   resize  the same; query down-sampling halves
#                                                       the token grid
#   segformer      1 (none)              -      -       the MiT's convolutions take any size
#                                                       (mmseg, transformers)
#   eomt           patch                 black  crop    EoMT pads the uint8 image and crops the
#                                                       upsampled logits back
PADDING_RULES = {"segvit": ("divisor", "zero", "resize"),
                 "segvit_shrunk": ("divisor", "zero", "resize"),
                 "segformer": (1, "zero", "resize"),
                 "eomt": ("divisor", "black", "crop")}


def input_padding(model_cfg: Mapping[str, Any]) -> Padding:
  """The `PADDING_RULES` entry of a model config, its multiple resolved ("divisor":
  `input_divisor`)."""
  name = family(model_cfg)
  if name not in PADDING_RULES:
    raise ValueError(f"a {name!r} model (a backbone alone) has no test-time padding rule")
  multiple, fill, back = PADDING_RULES[name]
  if multiple == "divisor":
    multiple = input_divisor(model_cfg)
  return Padding(int(multiple), fill, back)


def patch_size(model_cfg: Mapping[str, Any]) -> int:
  """The backbone patch size a model config implies (its variant, or an explicit override)."""
  return vit.patch_size(model_cfg["backbone"])


def training_inputs(model_cfg: Mapping[str, Any], step: jax.Array | None) -> dict[str, Any]:
  """Step-dependent keyword inputs of the model's training-mode forward pass (EoMT's
  masked-attention probabilities); {} for the families that take none."""
  module = MODELS[family(model_cfg)]
  if not hasattr(module, "training_inputs"):
    return {}
  return module.training_inputs(model_cfg, step)
