"""SegViT and SegViT-Shrunk in plain PyTorch (the optional extra `torch`: `pip install -e
'.[torch]'`): `torch.nn.Module`s with the forward pass of our Flax models and the state-dict
names of the authors' release (zbwxp/SegVit, mmseg 0.24), no mmcv or mmseg (`segvit.py`).

  model = segvit_jax.torch.load("segvit.pt")          # a `--to torch` file
  model = segvit_jax.torch.load("weights/segvit_b16")  # one of our bundles
  model = segvit_jax.torch.load("release.pth", config="configs/segvit_vit_b16_ade20k.py")
  out = model(images)  # (B, 3, H, W) normalised with model.mean / model.std (0-255 pixels)
  out["semantic_scores"]  # (B, K, H, W); also class_logits, mask_logits, aux_outputs

`python -m segvit_jax.convert BUNDLE OUT.pt --to torch` (or `export`) writes the file `load`
reads: torch.save of {"state_dict": float32 tensors (the release's names), "meta": {"format":
"segvit_jax.torch", "version": 1, "model": the bundle's `config.model`, "mean", "std",
"class_names"}}, plain containers only, so `torch.load(path, weights_only=True)` reads it;
`--from torch` (`to_bundle`) turns such a file, e.g. of a model fine-tuned in torch, back into
a bundle.

Weights reach the modules through the converter of the release's layout
(`segvit_jax.convert.segvit_official`: its key table maps our bundles' parameters to the
release's names, and it reads release files, which record no tap layers, shrink_idx or head
counts: `config` says them) and load strictly: a missing, unexpected or mis-shaped tensor is a
ValueError naming the keys. The modules run what that layout can hold: a ViT with a class
token kept out of the blocks or not (`cls_in_blocks`), no final norm, LayerScale or
registers, a GELU MLP, any position-embedding resize of `layers.RESIZE_METHODS`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import ml_collections
import numpy as np

from segvit_jax import bundle as bundle_lib
from segvit_jax.convert import rules, segvit_official, whole_model
from segvit_jax.models import segvit as flax_segvit
from segvit_jax.models import shrunk as flax_shrunk

torch = rules.import_torch("segvit_jax.torch (SegViT as torch.nn modules)")

from segvit_jax.torch.segvit import SegViT, SegViTShrunk  # noqa: E402  (needs torch, above)

FORMAT, VERSION = "segvit_jax.torch", 1
__all__ = ["FORMAT", "SegViT", "SegViTShrunk", "export", "from_bundle", "from_config",
           "from_release", "load", "load_state", "read_file", "save", "to_bundle"]

# What the release's modules cannot hold (their parameters), with the value they need.
_FIXED_BACKBONE = {k: segvit_official.RELEASE_BACKBONE[k]
                   for k in ("cls_token", "final_norm", "layerscale", "num_registers", "ffn",
                             "rope_theta", "key_bias")}


def _defaults(module: type, names: tuple[str, ...]) -> dict[str, Any]:
  """The defaults of the Flax module's fields `names` (one place for every default)."""
  fields = {f.name: f.default for f in dataclasses.fields(module)}
  return {n: fields[n] for n in names}


def _plain(model_cfg: Any) -> dict[str, Any]:
  """A model config (ConfigDict or mapping) as plain data: dicts, lists, str, numbers."""
  def plain(x):
    if isinstance(x, Mapping):
      return {k: plain(v) for k, v in x.items()}
    return [plain(v) for v in x] if isinstance(x, (list, tuple)) else x

  return plain(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg)


def from_config(model_cfg: Any) -> SegViT:
  """The (randomly initialised, eval-mode) module a model config (a bundle's / config's
  `config.model`: name "segvit", head.type "atm" or "shrunk") describes. Fields left out take
  our Flax models' defaults; dropout and drop path are not run (inference)."""
  cfg = _plain(model_cfg)
  if cfg.get("name", "segvit") != "segvit":
    raise ValueError(f"model.name={cfg.get('name')!r}: segvit_jax.torch builds SegViT models "
                     "(model.name='segvit')")
  if cfg["backbone"].get("type", "vit") != "vit":
    raise ValueError(f"backbone.type={cfg['backbone']['type']!r}: segvit_jax.torch builds "
                     "SegViT on a plain ViT (backbone.type='vit')")
  bb, head = segvit_official.resolved_backbone(cfg["backbone"]), dict(cfg["head"])
  bad = [f"backbone.{k}={bb[k]!r} (supported: {v!r})" for k, v in _FIXED_BACKBONE.items()
         if bb[k] != v]
  if bad:
    raise ValueError("segvit_jax.torch cannot build this model: " + "; ".join(bad))
  kind = head.get("type", "atm")
  backbone = {k: bb[k] for k in ("width", "depth", "mlp_dim", "num_heads", "patch_size",
                                 "posemb_grid", "posemb_resize", "cls_in_blocks", "norm_eps",
                                 "shrink_idx")}
  if kind == "atm":
    if backbone["shrink_idx"] is not None:
      raise ValueError("backbone.shrink_idx (query down-sampling) is SegViT-Shrunk's: set "
                       "head.type='shrunk'")
    names, cls = ("layers_per_stage", "mlp_ratio"), SegViT
    fields = _defaults(flax_segvit.ATMHead, names)
  elif kind == "shrunk":
    names, cls = ("query_grid", "qu_layers", "atm_layers", "mlp_ratio", "query_resize"), \
        SegViTShrunk
    fields = _defaults(flax_shrunk.ShrunkHead, names[1:])
  else:
    raise ValueError(f"head.type={kind!r}: expected 'atm' or 'shrunk'")
  fields.update({k: head[k] for k in ("width", "num_heads", *names) if k in head})
  missing = [f"head.{k}" for k in ("width", "num_heads", *names) if k not in fields]
  if missing:
    raise ValueError(f"the model config has no {', '.join(missing)}")
  return cls(cfg["num_classes"], backbone, fields, head["tap_layers"], config=cfg).eval()


def load_state(model: SegViT, state: Mapping[str, Any], source: str) -> SegViT:
  """Loads `state` (the release's names -> arrays or tensors) into `model`, strictly: every
  tensor of the model, nothing else, the same shapes; else a ValueError naming the keys."""
  want = model.state_dict()
  shape = lambda v: tuple(np.shape(v))  # noqa: E731
  missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
  wrong = [f"{k} {shape(state[k])} (the model: {tuple(want[k].shape)})" for k in want
           if k in state and shape(state[k]) != tuple(want[k].shape)]
  if missing or unexpected or wrong:
    parts = [f"{what} ({len(keys)}): {rules.key_list(keys)}" for what, keys in (
        ("missing", missing), ("unexpected", unexpected), ("mis-shaped", wrong)) if keys]
    raise ValueError(f"{source} does not fit the model its config describes: "
                     + "; ".join(parts))
  model.load_state_dict({k: torch.as_tensor(np.asarray(v, np.float32)) for k, v in state.items()},
                        strict=True)
  return model


def _with_info(model: SegViT, mean: Any, std: Any, class_names: Any) -> SegViT:
  model.mean, model.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
  model.class_names = tuple(class_names)
  return model


def from_bundle(path: str) -> SegViT:
  """One of our SegViT / SegViT-Shrunk bundles as a module (its pixel statistics and class
  names in `mean`, `std`, `class_names`)."""
  meta = bundle_lib.read_config(path)
  model = from_config(meta["model"])
  kind = meta["model"]["head"].get("type", "atm")
  state = segvit_official.release_state_dict(bundle_lib.load_params(path), kind, path)
  return _with_info(load_state(model, state, path), meta["mean"], meta["std"],
                    meta.get("class_names", ()))


def from_release(path: str, config: ml_collections.ConfigDict | str, *,
                 trust_pickle: bool = False) -> SegViT:
  """A .pth of the authors' release (the mmseg SegViT checkpoints) as a module. The file does
  not record tap layers, shrink_idx or head counts: `config` (a ConfigDict or
  'configs/X.py[:ARG]') says them, and the class names and pixel statistics."""
  config = whole_model.load_config(config)
  params, model_cfg = segvit_official.load(path, config, trust_pickle=trust_pickle)
  state = segvit_official.release_state_dict(params, model_cfg.head.get("type", "atm"), path)
  return _with_info(load_state(from_config(model_cfg), state, path), config.mean, config.std,
                    whole_model.class_names(config))


def load(path: str, config: ml_collections.ConfigDict | str | None = None, *,
         trust_pickle: bool = False) -> SegViT:
  """The eval-mode SegViT / SegViT-Shrunk module of `path`: a file `export` / `save` wrote, a
  bundle directory, or (with `config`) a release .pth. Its `config` attribute is the model
  config; `mean`, `std` (0-255 pixels) and `class_names` come with it."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist")
  if os.path.isdir(path):
    if config is not None:
      raise ValueError(f"{path} is a bundle: it records its model (no config)")
    return from_bundle(path)
  if config is not None:
    return from_release(path, config, trust_pickle=trust_pickle)
  state, meta = read_file(path)
  model = load_state(from_config(meta["model"]), state, path)
  return _with_info(model, meta["mean"], meta["std"], meta["class_names"])


def save(model: SegViT, path: str) -> str:
  """Writes `model` (built by `from_config` / `load`: it has a `config`) as a file `load`
  reads, atomically; returns its absolute path."""
  if getattr(model, "config", None) is None:
    raise ValueError("the model has no config (build it with segvit_jax.torch.from_config)")
  state = {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}
  meta = {"format": FORMAT, "version": VERSION, "model": _plain(model.config),
          "mean": list(getattr(model, "mean", None) or ()),
          "std": list(getattr(model, "std", None) or ()),
          "class_names": list(getattr(model, "class_names", None) or ())}
  return rules.write_torch_checkpoint(path, state, meta)


def read_file(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(state dict as numpy arrays, meta) of a file `save` wrote; a ValueError naming the file
  for anything else (a release checkpoint: `load(path, config=...)`)."""
  state, meta = rules.read_torch_checkpoint(path)
  if meta.get("format") != FORMAT:
    raise ValueError(f"{path} is not a {FORMAT} file (its meta.format is "
                     f"{meta.get('format')!r}; `--to torch` writes them); for a checkpoint of "
                     "the authors' release pass config='configs/X.py'")
  if meta.get("version") != VERSION:
    raise ValueError(f"{path}: {FORMAT} version {meta.get('version')!r}, this code reads "
                     f"version {VERSION}")
  return state, meta


def to_bundle(src: str, out: str, *, config: Any = None, trust_pickle: bool = False) -> str:
  """A file `save` wrote -> one of our bundles at `out` (`--from torch`): the release-named
  tensors mapped back through the converter's table, checked strictly against the Flax model
  of the file's config. The file records its model: no `config`."""
  del trust_pickle  # the files hold tensors and plain containers only
  if config is not None:
    raise ValueError(f"{src} records its model: --from torch takes no --config")
  state, meta = read_file(src)
  model_cfg = meta["model"]
  load_state(from_config(model_cfg), state, src)  # what the modules cannot run fails here
  kind = model_cfg["head"].get("type", "atm")
  flat = rules.to_ours(state, segvit_official.RULES[kind], source=src, layout=FORMAT)
  abstract = whole_model.abstract_variables(ml_collections.ConfigDict(model_cfg))
  params = bundle_lib.merge_params(abstract["params"],
                                   rules.unflatten(flat), source=src)
  return bundle_lib.save_bundle(out, params, model_cfg, mean=meta["mean"], std=meta["std"],
                                class_names=meta["class_names"],
                                source=os.path.abspath(src), source_format="torch")


def export(bundle_path: str, out: str) -> str:
  """A SegViT / SegViT-Shrunk bundle -> a file `load` reads (`--to torch`)."""
  meta = bundle_lib.read_config(bundle_path)
  if meta.get("model", {}).get("name", "segvit") != "segvit":
    raise ValueError(f"{bundle_path} is a {meta['model'].get('name')!r} bundle; --to torch "
                     "writes SegViT models (a bundle of model.name='segvit')")
  return save(from_bundle(bundle_path), out)
