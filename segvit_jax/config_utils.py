"""Config files: `configs/NAME.py[:ARG]` -> the ConfigDict of its `get_config(ARG)`.
(Parsing `--config` and its `--config.key=value` overrides: `segvit_jax.runtime`.)"""

from __future__ import annotations

import importlib.util
import os

import ml_collections


def load_config(spec: str) -> ml_collections.ConfigDict:
  """'configs/NAME.py[:ARG]' -> the ConfigDict its `get_config(ARG)` returns."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path} not found")
  module_spec = importlib.util.spec_from_file_location("_segvit_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()
