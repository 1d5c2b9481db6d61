"""The one key-rule table every converter uses, both ways, and the file readers and writers.

A layout is a table of `KeyRule`s, as MaxText's param_mapping: each pairs a key template of
their checkpoint with one of our parameter paths (or several, for a tensor they pack), the
transform into our layout and its inverse. `to_ours` maps a foreign state dict through the
table (import), `to_theirs` maps our flat parameters back (export) and checks that the table
is one-to-one on them. Tables of layouts that are only read may hold rules without an inverse
(`to_theirs=None`); `to_theirs` refuses such a table.

Templates. Literal text with fields in braces, matched against a whole key:
  `{i}`          an integer field (decimal digits): `blocks.{i}.norm1` <-> `encoderblock_{i}/norm1`
  `{s+1}` `{s-1}` the same field with an offset: the key holds s + 1 (a layout that numbers
                 its stages from 1, ours from 0) or s - 1
  `{n:1|2}`      a field that is one of the listed strings, written as it is
Our templates use the fields of theirs (same kind; offsets may differ). A field only their
template has (e.g. the chunk of DINOv2's `blocks.{chunk}.{i}`) is matched and forgotten: such a
rule reads only.

Parameters travel as flat dicts `{"encoderblock_0/attn/query/kernel": np.ndarray}` (paths of
our models, '/'-joined), numpy float32 throughout. The small per-layer builders (`linear`,
`norm`, `conv`, `batch_norm`, `packed_attention`, ...) write the rules of one torch module.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pickle
import re
import shutil
import sys
import zipfile
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax
import numpy as np

Flat = dict[str, np.ndarray]
Transform = Callable[..., "np.ndarray | Sequence[np.ndarray]"]
QKV = ("query", "key", "value")


# ----------------------------------------------------------------------------------------------
# Templates

_FIELD = re.compile(r"\{(\w+)(?:([+-]\d+)|:([^{}]+))?\}")


@dataclasses.dataclass(frozen=True)
class Field:
  """A template field: an integer (`choices` None) with the `offset` the key adds to it, or
  one of `choices`."""

  name: str
  offset: int = 0
  choices: tuple[str, ...] | None = None

  @property
  def kind(self) -> str | tuple[str, ...]:
    return "int" if self.choices is None else self.choices


@functools.lru_cache(maxsize=None)
def compile_template(template: str) -> tuple[re.Pattern, dict[str, Field]]:
  """A key template -> (full-match regex with a group per field, name -> Field)."""
  parts, pos, fields = [], 0, {}
  for m in _FIELD.finditer(template):
    name = m[1]
    if name in fields:
      raise ValueError(f"template {template!r} names the field {name!r} twice")
    choices = tuple(m[3].split("|")) if m[3] else None
    fields[name] = Field(name, int(m[2] or 0), choices)
    group = r"\d+" if choices is None else "|".join(re.escape(c) for c in choices)
    parts += [re.escape(template[pos:m.start()]), f"(?P<{name}>{group})"]
    pos = m.end()
  rest = template[pos:]
  if "{" in rest or "}" in rest:
    raise ValueError(f"template {template!r}: unbalanced or malformed field")
  return re.compile("".join(parts + [re.escape(rest)])), fields


def template_fields(template: str) -> dict[str, Field]:
  return compile_template(template)[1]


def parse_key(template: str, key: str) -> dict[str, int | str] | None:
  """The field values of `key` under `template` (offsets removed), or None: no match."""
  regex, fields = compile_template(template)
  m = regex.fullmatch(key)
  if m is None:
    return None
  return {name: (int(value) - fields[name].offset if fields[name].choices is None else value)
          for name, value in m.groupdict().items()}


def format_key(template: str, values: Mapping[str, int | str]) -> str:
  """`template` with its fields filled from `values` (extra values are ignored)."""
  fields = template_fields(template)

  def fill(m: re.Match) -> str:
    field, value = fields[m[1]], values[m[1]]
    if field.choices is None:
      return str(int(value) + field.offset)
    if value not in field.choices:
      raise ValueError(f"{value!r} is not one of {field.choices} (template {template!r})")
    return str(value)

  return _FIELD.sub(fill, template)


def natural_key(key: str) -> list:
  """Sort key with numbers compared as numbers (layers.2 before layers.10)."""
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def key_list(keys: Iterable[str], limit: int = 20) -> str:
  """Some of `keys` for a message, in natural order, with how many more there are."""
  keys = sorted(keys, key=natural_key)
  return ", ".join(keys[:limit]) + (f" ... and {len(keys) - limit} more" if len(keys) > limit
                                    else "")


# ----------------------------------------------------------------------------------------------
# Transforms: theirs -> ours, and the inverses

def identity(x):
  return x


def transpose(w):
  """torch Linear weight (out, in) <-> Flax Dense kernel (in, out); its own inverse."""
  return w.T


def from_torch_conv(w):
  """torch Conv2d (out, in, kh, kw) -> Flax Conv (kh, kw, in, out)."""
  return w.transpose(2, 3, 1, 0)


def to_torch_conv(w):
  """Flax Conv (kh, kw, in, out) -> torch Conv2d (out, in, kh, kw)."""
  return w.transpose(3, 2, 0, 1)


def from_torch_conv_transpose(w):
  """torch ConvTranspose2d (in, out, kh, kw) -> Flax ConvTranspose (kh, kw, in, out), both
  spatial axes flipped (Flax does not flip its kernel; see models/eomt.py)."""
  return np.ascontiguousarray(w.transpose(2, 3, 0, 1)[::-1, ::-1])


def to_torch_conv_transpose(w):
  """Inverse of `from_torch_conv_transpose`."""
  return np.ascontiguousarray(w[::-1, ::-1].transpose(2, 3, 0, 1))


def unpack(w, parts: int) -> list[np.ndarray]:
  """A torch Linear that packs `parts` layers on its output axis (q, k, v; k, v; a SwiGLU's
  gate, value), weight (parts * out, in) or bias (parts * out,) -> our `parts` Flax kernels
  (in, out) or biases, in order."""
  return [p.T if p.ndim == 2 else p for p in np.split(w, parts, axis=0)]


def pack(*parts):
  """Inverse of `unpack`."""
  return np.concatenate([p.T if p.ndim == 2 else p for p in parts], axis=0)


def merge_heads_in(w):
  """big_vision DenseGeneral (D, H, hd) -> (D, H * hd); also bias (H, hd) -> (H * hd,)."""
  return w.reshape(*w.shape[:-2], -1)


def merge_heads_out(w):
  """big_vision DenseGeneral out (H, hd, D) -> (H * hd, D)."""
  return w.reshape(-1, w.shape[-1])


# ----------------------------------------------------------------------------------------------
# The rule type

@dataclasses.dataclass(frozen=True)
class KeyRule:
  """`theirs` (a key template of their layout) <-> `ours` (a parameter-path template, or a
  tuple of them for a tensor they pack). `to_ours` takes their tensor and returns ours (a
  list for a tuple); `to_theirs` takes ours (one argument per path) and returns theirs, or is
  None for a rule that only reads."""

  theirs: str
  ours: str | tuple[str, ...]
  to_ours: Transform = identity
  to_theirs: Transform | None = identity

  def __post_init__(self):
    theirs = template_fields(self.theirs)
    names = None
    for path in self.our_paths:
      ours = template_fields(path)
      bad = [n for n, f in ours.items() if n not in theirs or theirs[n].kind != f.kind]
      if bad:
        raise ValueError(f"KeyRule {self.theirs!r} -> {path!r}: field(s) {bad} are not fields "
                         "of the same kind in their template")
      if names is not None and set(ours) != names:
        raise ValueError(f"KeyRule {self.theirs!r}: the paths of {self.ours} have other fields")
      names = set(ours)

  @property
  def our_paths(self) -> tuple[str, ...]:
    return (self.ours,) if isinstance(self.ours, str) else self.ours

  @property
  def invertible(self) -> bool:
    """Whether the rule writes their key back: an inverse, and every field of theirs known
    from ours."""
    return (self.to_theirs is not None
            and set(template_fields(self.theirs)) == set(template_fields(self.our_paths[0])))


def _first_match(rules: Sequence[KeyRule], key: str):
  for rule in rules:
    fields = parse_key(rule.theirs, key)
    if fields is not None:
      return rule, fields
  return None


def to_ours(tensors: Mapping[str, np.ndarray], rules: Sequence[KeyRule], *, source: str,
            layout: str, dropped: Sequence[str] = (), model: str | None = None) -> Flat:
  """Their keys -> our flat parameter paths, through the first rule that matches each key.
  Keys no rule and no `dropped` pattern (regexes, full match) knows fail with their names.
  `layout` names the format in messages; `model` (e.g. "ViT"), for layouts of one kind of
  model, says the file is not such a checkpoint."""
  patterns = [re.compile(p) for p in dropped]
  out: Flat = {}
  unknown = []
  for key, value in tensors.items():
    match = _first_match(rules, key)
    if match is None:
      if not any(p.fullmatch(key) for p in patterns):
        unknown.append(key)
      continue
    rule, fields = match
    values = rule.to_ours(np.asarray(value))
    values = [values] if isinstance(rule.ours, str) else list(values)
    for path, v in zip(rule.our_paths, values, strict=True):
      name = format_key(path, fields)
      if name in out:
        raise ValueError(f"{source}: two tensors map to {name!r} (second: {key!r})")
      out[name] = np.asarray(v, np.float32)
  if unknown:
    if model:
      raise ValueError(f"{source} is not a {layout} {model} checkpoint: {len(unknown)} "
                       f"tensor(s) this layout does not have: {key_list(unknown)}")
    raise ValueError(f"{source}: {len(unknown)} tensor(s) the {layout} layout of this model "
                     f"does not have: {key_list(unknown)}")
  return out


def to_theirs(params: Mapping[str, np.ndarray], rules: Sequence[KeyRule], *, source: str,
              layout: str) -> dict[str, np.ndarray]:
  """Our flat parameters -> their keys (natural order), float32 and contiguous. Every
  parameter must be mapped: the rest fail with their names, as do packed groups with a part
  missing. The result maps back to the same keys and shapes (`check_invertible`)."""
  one_way = [r.theirs for r in rules if not r.invertible]
  if one_way:
    raise ValueError(f"the {layout} table only reads: {len(one_way)} rule(s) have no inverse: "
                     f"{key_list(one_way)}")
  left = dict(params)
  out: dict[str, np.ndarray] = {}
  incomplete = []
  for rule in rules:
    first, *others = rule.our_paths
    for key in params:
      fields = parse_key(first, key)
      if fields is None:
        continue
      names = [key] + [format_key(t, fields) for t in others]
      if any(n not in left for n in names):
        incomplete.append(f"{key} (needs {', '.join(n for n in names if n not in left)})")
        for n in names:  # reported once, as the group
          left.pop(n, None)
        continue
      value = rule.to_theirs(*[np.asarray(left.pop(n)) for n in names])
      out[format_key(rule.theirs, fields)] = np.ascontiguousarray(value, np.float32)
  if left or incomplete:
    lines = [f"{source}: parameters the {layout} layout cannot hold:"]
    if left:
      lines.append(f"  unmapped ({len(left)}): {key_list(left)}")
    if incomplete:
      lines.append(f"  incomplete packed groups ({len(incomplete)}): {key_list(incomplete)}")
    raise ValueError("\n".join(lines))
  out = {k: out[k] for k in sorted(out, key=natural_key)}
  check_invertible(params, out, rules, source=source, layout=layout)
  return out


def check_invertible(params: Mapping[str, np.ndarray], theirs: Mapping[str, np.ndarray],
                     rules: Sequence[KeyRule], *, source: str, layout: str) -> None:
  """`theirs` (written from `params`) maps back to the keys and shapes of `params`."""
  back = to_ours(theirs, rules, source=source, layout=layout)
  if {k: v.shape for k, v in back.items()} != {k: np.shape(v) for k, v in params.items()}:
    raise AssertionError(f"{layout} table is not invertible for {source}")


# ----------------------------------------------------------------------------------------------
# Rule builders: one torch module each. `theirs` is its key (without `.weight`), `ours` our
# module's path (without `/kernel`).

def linear(theirs: str, ours: str, *, bias: bool = True) -> tuple[KeyRule, ...]:
  """torch Linear <-> Flax Dense."""
  rules = (KeyRule(f"{theirs}.weight", f"{ours}/kernel", transpose, transpose),)
  return rules + ((KeyRule(f"{theirs}.bias", f"{ours}/bias"),) if bias else ())


def norm(theirs: str, ours: str) -> tuple[KeyRule, ...]:
  """torch LayerNorm (weight, bias) <-> Flax LayerNorm (scale, bias)."""
  return (KeyRule(f"{theirs}.weight", f"{ours}/scale"), KeyRule(f"{theirs}.bias", f"{ours}/bias"))


def conv(theirs: str, ours: str, *, bias: bool = True) -> tuple[KeyRule, ...]:
  """torch Conv2d (grouped ones too) <-> Flax Conv."""
  rules = (KeyRule(f"{theirs}.weight", f"{ours}/kernel", from_torch_conv, to_torch_conv),)
  return rules + ((KeyRule(f"{theirs}.bias", f"{ours}/bias"),) if bias else ())


def conv_transpose(theirs: str, ours: str) -> tuple[KeyRule, ...]:
  """torch ConvTranspose2d <-> Flax ConvTranspose (kernel flipped)."""
  return (KeyRule(f"{theirs}.weight", f"{ours}/kernel", from_torch_conv_transpose,
                  to_torch_conv_transpose),
          KeyRule(f"{theirs}.bias", f"{ours}/bias"))


def batch_norm(theirs: str, params: str, stats: str) -> tuple[KeyRule, ...]:
  """torch BatchNorm2d <-> Flax BatchNorm: weight / bias under `params` (the params
  collection's path), running_mean / running_var under `stats` (batch_stats'). The int64
  `num_batches_tracked` is not a weight: the layouts handle it apart."""
  return (*norm(theirs, params), KeyRule(f"{theirs}.running_mean", f"{stats}/mean"),
          KeyRule(f"{theirs}.running_var", f"{stats}/var"))


def packed_linear(theirs: str, ours: Sequence[str], *, weight: str = ".weight",
                  bias: str = ".bias") -> tuple[KeyRule, ...]:
  """One torch Linear holding len(ours) layers stacked on its output axis <-> our Dense
  layers `ours`, in order (keys `theirs + weight`, `theirs + bias`)."""
  split = functools.partial(unpack, parts=len(ours))
  return (KeyRule(theirs + weight, tuple(f"{o}/kernel" for o in ours), split, pack),
          KeyRule(theirs + bias, tuple(f"{o}/bias" for o in ours), split, pack))


def attention(theirs: str, ours: str, names: Sequence[str]) -> tuple[KeyRule, ...]:
  """Separate query, key, value and output torch Linear layers `theirs + names[n]` <-> our
  Attention's query, key, value and out Dense layers under `ours`."""
  return tuple(r for name, o in zip(names, (*QKV, "out"), strict=True)
               for r in linear(theirs + name, f"{ours}/{o}"))


def packed_attention(theirs: str, ours: str) -> tuple[KeyRule, ...]:
  """torch nn.MultiheadAttention (q, k, v stacked in in_proj; out_proj) <-> our Attention."""
  return (*packed_linear(f"{theirs}.in_proj", [f"{ours}/{n}" for n in QKV], weight="_weight",
                         bias="_bias"),
          *linear(f"{theirs}.out_proj", f"{ours}/out"))


def mlp(theirs: str, ours: str, names: Sequence[str] = ("fc1", "fc2")) -> tuple[KeyRule, ...]:
  """A two-layer MLP, torch Linear layers `theirs + names[0|1]` <-> our fc1 / fc2."""
  return tuple(r for name, o in zip(names, ("fc1", "fc2"), strict=True)
               for r in linear(theirs + name, f"{ours}/{o}"))


def swiglu(theirs: str, ours: str, names: Sequence[str]) -> tuple[KeyRule, ...]:
  """A SwiGLU FFN, out = w3(silu(w1 x) * w2 x), <-> our w1 / w2 / w3. `names`: their packed
  [gate; value] Linear and the output one (2 names), or gate, value and output (3)."""
  if len(names) == 2:
    return (*packed_linear(theirs + names[0], [f"{ours}/w1", f"{ours}/w2"]),
            *linear(theirs + names[1], f"{ours}/w3"))
  return tuple(r for name, o in zip(names, ("w1", "w2", "w3"), strict=True)
               for r in linear(theirs + name, f"{ours}/{o}"))


# ----------------------------------------------------------------------------------------------
# Flat parameter trees

def flatten(tree) -> Flat:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def unflatten(flat: Mapping[str, Any]):
  return flax.traverse_util.unflatten_dict(dict(flat), sep="/")


def strip_prefix(tensors: Mapping[str, np.ndarray], prefixes: Iterable[str]) -> dict:
  """Removes from each key the first of `prefixes` it starts with."""
  out = {}
  for k, v in tensors.items():
    for p in prefixes:
      if k.startswith(p):
        k = k[len(p):]
        break
    out[k] = v
  return out


# ----------------------------------------------------------------------------------------------
# Reading files

def import_torch(purpose: str = "reading PyTorch .pth/.bin files"):
  """torch, or an ImportError saying how to install it (only the .pth layouts and
  `segvit_jax.torch` need it); `purpose` names what needs it."""
  try:
    import torch  # pylint: disable=g-import-not-at-top  (an optional, heavy dependency)
  except ImportError:
    raise ImportError(f"{purpose} needs torch (the CPU build is enough): "
                      "pip install 'segvit_jax[torch]'") from None
  return torch


def _to_numpy(value) -> np.ndarray:
  if value.is_floating_point():
    value = value.float()
  return value.detach().cpu().numpy()


# torch.load(weights_only=True)'s text for a file that pickles a Python object it does not
# allow ("Unsupported global: GLOBAL module.name was not an allowed global ..."): the one
# refusal --trust-pickle can help with. Other failures (unknown opcodes, EOF, a zip without its
# central directory) are a corrupt or truncated file.
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def pickled_global(error: BaseException) -> str | None:
  """The `module.name` a weights-only torch.load refused, if that is why it failed and the
  name is a plausible one: a name inside an imported module that does not have it (a
  truncated `torch._utils._rebuild_tens`) is the debris of a cut file, not an object."""
  m = _UNSUPPORTED_GLOBAL.search(str(error))
  if m is None:
    return None
  module, _, name = m.group(1).rpartition(".")
  loaded = sys.modules.get(module)
  if module != "__main__" and loaded is not None and not hasattr(loaded, name):
    return None
  return m.group(1)


def corrupt(path: str, kind: str, error: BaseException) -> ValueError:
  """The error for a file that is not a readable `kind`: corrupt or truncated, with the
  reader's reason (its first line)."""
  text = str(error).strip()
  m = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)  # past torch's long preamble
  reason = (m.group(1) if m else text.splitlines()[0] if text else "").split(". ")[0]
  reason = f"{type(error).__name__}: {reason}" if reason else type(error).__name__
  return ValueError(f"{path} is not a readable {kind}: the file is corrupt or truncated "
                    f"({reason}); download or write it again")


def torch_load(path: str, *, trust_pickle: bool = False) -> Any:
  """`torch.load(path)` on the CPU, weights only unless `trust_pickle`. ValueError naming the
  file when it holds other pickled Python objects (the --trust-pickle message, only for a
  genuine object), or when it is corrupt or truncated."""
  torch = import_torch()
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  (torch raises many types on bad bytes)
    name = pickled_global(e) if isinstance(e, pickle.UnpicklingError) else None
    if name is None:
      raise corrupt(path, "PyTorch checkpoint", e) from None
    if not trust_pickle:
      raise ValueError(
          f"{path} holds pickled Python objects besides tensors ({name}), so "
          "torch.load(weights_only=True) refuses it. Unpickling it can run arbitrary code. If "
          "you trust where the file comes from, pass --trust-pickle (Python: "
          "trust_pickle=True); or re-save its state dict as .safetensors.") from None
  try:
    return torch.load(path, map_location="cpu", weights_only=False)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path} cannot be unpickled even with --trust-pickle ({type(e).__name__}: "
                     f"{e}): it is corrupt, or needs the code that wrote it") from None


def read_torch_checkpoint(path: str, *, trust_pickle: bool = False) -> tuple[Flat, dict]:
  """(tensors, meta) of a PyTorch checkpoint: tensors as `read_torch` gives them, and the
  `meta` dict beside the state dict (mmseg's CLASSES / PALETTE, our exports' model config),
  {} if none. safetensors files have no meta."""
  if path.endswith(".safetensors"):
    return read_safetensors(path), {}
  torch = import_torch()
  obj = torch_load(path, trust_pickle=trust_pickle)
  meta = obj.get("meta") if isinstance(obj, dict) else None
  for wrapper in ("state_dict", "model"):
    if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
      obj = obj[wrapper]
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: expected a state dict (key -> tensor), got {type(obj).__name__}")
  tensors = {k: _to_numpy(v) for k, v in obj.items() if isinstance(v, torch.Tensor)}
  return tensors, meta if isinstance(meta, dict) else {}


def read_torch(path: str, *, trust_pickle: bool = False) -> Flat:
  """A PyTorch checkpoint as {key: array}: safetensors directly; .pth/.bin through
  `torch.load(weights_only=True)`, refusing files that pickle other Python objects unless
  `trust_pickle`. Unwraps `state_dict` / `model` wrappers; drops non-tensor entries."""
  return read_torch_checkpoint(path, trust_pickle=trust_pickle)[0]


def read_safetensors(path: str) -> Flat:
  """A .safetensors file as {key: array} (floats as float32); ValueError naming the file when
  it is corrupt or truncated (safetensors' own error is no ValueError and names no file)."""
  from safetensors import SafetensorError  # pylint: disable=g-import-not-at-top
  from safetensors.flax import load_file  # pylint: disable=g-import-not-at-top  (bf16-safe)
  try:
    loaded = load_file(path)
  except SafetensorError as e:
    raise corrupt(path, ".safetensors file", e) from None
  return {k: np.asarray(v, np.float32 if np.issubdtype(v.dtype, np.floating)
                        or v.dtype.name == "bfloat16" else v.dtype)
          for k, v in loaded.items()}


def read_npz(path: str) -> Flat:
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  except (ValueError, OSError, AttributeError, EOFError, zipfile.BadZipFile) as e:
    # not a zip (or a truncated one), pickled, or a lone .npy
    raise ValueError(f"{path} is not a readable .npz archive of arrays ({e})") from None


def read_json(path: str) -> Any:
  """A JSON file's content; ValueError naming the file when it is not valid JSON."""
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON, the file is corrupt or truncated: {e}") from None


def read_hf_dir(path: str, *, trust_pickle: bool = False) -> tuple[dict, Flat]:
  """(config.json, tensors) of a transformers `save_pretrained` directory: model.safetensors,
  a sharded model.safetensors.index.json, or pytorch_model.bin."""
  cfg_file = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_file):
    raise FileNotFoundError(f"{cfg_file} not found: expected a directory written by "
                            "transformers' save_pretrained (config.json + model.safetensors)")
  config = read_json(cfg_file)
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    files = sorted(set(read_json(index)["weight_map"].values()))
    tensors = {}
    for name in files:
      tensors.update(read_safetensors(os.path.join(path, name)))
  elif os.path.isfile(os.path.join(path, "model.safetensors")):
    tensors = read_safetensors(os.path.join(path, "model.safetensors"))
  elif os.path.isfile(os.path.join(path, "pytorch_model.bin")):
    tensors = read_torch(os.path.join(path, "pytorch_model.bin"), trust_pickle=trust_pickle)
  else:
    raise FileNotFoundError(f"{path}: no model.safetensors(.index.json) or pytorch_model.bin")
  return config, tensors


def read_hf_model_dir(path: str, model_type: str, *, fmt: str, name: str,
                      trust_pickle: bool = False) -> tuple[dict, Flat]:
  """`read_hf_dir` of a directory that must hold a `model_type` model (`name` in messages,
  read as format `fmt`)."""
  config, tensors = read_hf_dir(path, trust_pickle=trust_pickle)
  if config.get("model_type") != model_type:
    raise ValueError(f"{path}/config.json has model_type={config.get('model_type')!r}; "
                     f"--from {fmt} reads {name} directories (model_type '{model_type}')")
  return config, tensors


def hf_unsupported(config: Mapping[str, Any]) -> dict[str, Any]:
  """The fields of a transformers config.json our models do not have: an activation other
  than exact GELU, input other than RGB."""
  return {k: config[k] for k, want in (("hidden_act", "gelu"), ("num_channels", 3))
          if config.get(k, want) != want}


def hf_mean_std(path: str, default):
  """Pixel mean / std (0-255) of a transformers directory's preprocessor_config.json, else
  `default`."""
  file = os.path.join(path, "preprocessor_config.json")
  if not os.path.isfile(file):
    return default
  pre = read_json(file)
  if "image_mean" not in pre or "image_std" not in pre:
    return default
  return (tuple(255.0 * m for m in pre["image_mean"]), tuple(255.0 * s for s in pre["image_std"]))


def hf_class_names(config: Mapping[str, Any], k: int) -> tuple[str, ...] | None:
  """The `k` class names of a transformers config.json's id2label, or None."""
  id2label = config.get("id2label") or {}
  names = tuple(id2label.get(str(i), id2label.get(i)) for i in range(k))
  return names if len(id2label) == k and None not in names else None


# ----------------------------------------------------------------------------------------------
# Writing files

def _contiguous(v: np.ndarray) -> np.ndarray:
  v = np.asarray(v)
  return v if v.flags.c_contiguous else np.ascontiguousarray(v)


def write_torch_checkpoint(out: str, state: Mapping[str, np.ndarray],
                           meta: Mapping[str, Any]) -> str:
  """torch.save of {"state_dict": tensors, "meta": meta} at `out`, atomically; `meta` holds
  plain containers only, so that weights_only loading accepts the file."""
  torch = import_torch()
  obj = {"state_dict": {k: torch.from_numpy(_contiguous(v)) for k, v in state.items()},
         "meta": dict(meta)}
  out = os.path.abspath(out)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  torch.save(obj, out + ".tmp")
  os.replace(out + ".tmp", out)
  return out


def write_hf_dir(out: str, state: Mapping[str, np.ndarray], config: Mapping[str, Any],
                 preprocessor: Mapping[str, Any]) -> str:
  """A directory `from_pretrained` loads: config.json, preprocessor_config.json and
  model.safetensors, written whole to `out.tmp/` and then moved in place, replacing `out`
  (`checkpoint.replace_dir`): a failed write leaves what was at `out` intact."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from segvit_jax import checkpoint  # pylint: disable=g-import-not-at-top  (orbax, grain)

  out = os.path.abspath(out)
  checkpoint.recover_dir(out)  # what a killed write left
  tmp = out + ".tmp"
  try:
    os.makedirs(tmp)
    for name, content in (("config.json", config), ("preprocessor_config.json", preprocessor)):
      with open(os.path.join(tmp, name), "w") as f:
        json.dump(content, f, indent=2)
    save_file({k: _contiguous(v) for k, v in state.items()}, os.path.join(tmp, "model.safetensors"),
              metadata={"format": "pt"})
    checkpoint.replace_dir(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out
