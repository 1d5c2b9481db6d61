"""segvit_jax: plain-ViT semantic segmentation (SegViT, SegFormer, EoMT) in JAX/Flax.

The names below are imported on first use (PEP 562), so `import segvit_jax` alone imports
nothing else: `python -m segvit_jax.data.synthetic` and the other module entry points then run
a module that is not yet imported (runpy warns otherwise).
"""

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {"Bundle": "bundle", "backbone_features": "bundle", "load_bundle": "bundle",
            "save_bundle": "bundle", "load_model": "checkpoint"}

__all__ = ["Bundle", "backbone_features", "load_bundle", "load_model", "save_bundle"]

if TYPE_CHECKING:
  from segvit_jax.bundle import Bundle, backbone_features, load_bundle, save_bundle
  from segvit_jax.checkpoint import load_model


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'segvit_jax' has no attribute {name!r}")
  value = getattr(importlib.import_module(f"segvit_jax.{_EXPORTS[name]}"), name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted([*globals(), *_EXPORTS])
