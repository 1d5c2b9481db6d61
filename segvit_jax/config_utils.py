"""Config-file loading and a readable error for unknown `--config.key=value` overrides."""

from __future__ import annotations

import importlib.util
import os
import sys

import ml_collections
from absl import flags


def load_config(spec: str) -> ml_collections.ConfigDict:
  """'configs/NAME.py[:ARG]' -> the ConfigDict its `get_config(ARG)` returns."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path} not found")
  module_spec = importlib.util.spec_from_file_location("_segvit_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def unknown_override(config: ml_collections.ConfigDict, argv: list[str],
                     flag: str = "config") -> str | None:
  """A message for the first `--{flag}.a.b=v` in argv whose key path is not in `config`."""
  prefix = f"--{flag}."
  for arg in argv:
    if not arg.startswith(prefix):
      continue
    key = arg[len(prefix):].split("=", 1)[0]
    node = config
    for i, part in enumerate(key.split(".")):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        where = ".".join(key.split(".")[:i]) or "the top level"
        known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        return (f"unknown config key {key!r} in {arg!r}: {where} has no {part!r}"
                + (f"; known keys there: {', '.join(known)}" if known else ""))
      node = node[part]
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parser for our CLIs: an unknown config override exits with a clear message."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError, flags.Error) as e:
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None and "--config" in argv:
      spec = argv[argv.index("--config") + 1]
    message = unknown_override(load_config(spec), argv) if spec else None
    sys.exit(f"error: {message or e}")
