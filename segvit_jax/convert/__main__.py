r"""Converts a pretrained ViT checkpoint into a segvit_jax backbone bundle, and whole SegViT,
SegFormer and EoMT models between the authors' releases (and transformers) and our bundles.

  python -m segvit_jax.convert SRC OUT --from FORMAT [--image_size 640] [--patch_size 16]
  python -m segvit_jax.convert SRC.pth OUT --from segvit-official --config configs/X.py[:ARG]
  python -m segvit_jax.convert BUNDLE OUT.pth --to segvit-official
  python -m segvit_jax.convert BUNDLE OUT.pt --to torch   (segvit_jax.torch.load(OUT.pt))
  python -m segvit_jax.convert SRC.pt OUT --from torch     (e.g. after fine-tuning in torch)
  python -m segvit_jax.convert SRC OUT --from segformer-official|hf-segformer [--config X.py]
  python -m segvit_jax.convert BUNDLE OUT --to segformer-official|hf-segformer
  python -m segvit_jax.convert SRC OUT --from eomt-official|hf-eomt|hf-eomt-dinov3 [--config X.py]
  python -m segvit_jax.convert BUNDLE OUT --to eomt-official|hf-eomt|hf-eomt-dinov3
  python -m segvit_jax.convert DELTA.bin OUT --from eomt-official --backbone DINOV3
  python -m segvit_jax.convert BUNDLE OUT.pth --to eomt-official [--delta_from DINOV3]

OUT is written atomically (bundles and transformers directories through a temporary directory
beside it, .pth files through a temporary file); an existing OUT is an error unless
--overwrite.

Flags take underscores; the dash spellings of earlier versions (--image-size, --patch-size,
--posemb-resize, --patch-resize, --num-heads, --trust-pickle) are aliases.

Examples (file names of the public releases; see the README, "Pretrained weights"):
  python -m segvit_jax.convert \
      L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-\
res_384.npz weights/augreg_l16 --from augreg-npz --image_size 640
  python -m segvit_jax.convert dinov2_vitl14_reg4_pretrain.pth weights/dinov2_l16_640 \
      --from dinov2 --image_size 640 --patch_size 16
  # DINOv3 (RoPE: no position grid to resample), the release's file or transformers' copy:
  python -m segvit_jax.convert dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth weights/dinov3_l16 \
      --from dinov3
  python -m segvit_jax.convert dinov3-vitl16-pretrain-lvd1689m/ weights/dinov3_l16 \
      --from hf-dinov3
  # a SegViT-Shrunk ViT-L/16 of the authors' release (the file does not record tap layers,
  # shrink_idx or head counts: the config says them), and back to the release's layout:
  python -m segvit_jax.convert shrunk_l16_ade.pth weights/shrunk_l16_ade \
      --from segvit-official --config configs/segvit_shrunk_vit_l16_ade20k.py
  python -m segvit_jax.convert weights/shrunk_l16_ade shrunk_l16_ade_again.pth --to segvit-official
  # SegFormer: the release's whole model (sizes, classes from the file; LayerNorm eps 1e-6),
  # a transformers directory (eps 1e-5), and back to either layout:
  python -m segvit_jax.convert segformer.b2.512x512.ade.160k.pth weights/segformer_b2_ade \
      --from segformer-official
  python -m segvit_jax.convert segformer-b2-finetuned-ade-512-512/ weights/segformer_b2_hf \
      --from hf-segformer
  python -m segvit_jax.convert weights/segformer_b2_ade segformer_b2_hf/ --to hf-segformer
  # an ImageNet MiT encoder (mit_b2.pth, or an HF nvidia/mit-b2 directory) is a backbone:
  # config.model_init='mit_b2.pth', config.model_init_format='segformer-official'
  # EoMT: a checkpoint of the release (Lightning .ckpt or its state dict; heads from the
  # width, L2 from its attn_mask_probs; --config adds class names), a transformers
  # save_pretrained directory, and back:
  python -m segvit_jax.convert EOMT_L_ADE20K.ckpt weights/eomt_l_ade \
      --from eomt-official --config configs/eomt_vit_l_ade20k.py
  python -m segvit_jax.convert EOMT_L_ADE20K_HF_DIR/ weights/eomt_l_ade_hf --from hf-eomt
  python -m segvit_jax.convert weights/eomt_l_ade eomt_l_ade_hf/ --to hf-eomt
  # EoMT on DINOv3 of the release (its model zoo's pytorch_model.bin files hold delta weights:
  # the DINOv3 weights they were fine-tuned from are added back), and back in either form:
  python -m segvit_jax.convert coco_panoptic_eomt_large_640_dinov3/pytorch_model.bin \
      weights/eomt_dinov3_l_coco --from eomt-official \
      --backbone dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth
  python -m segvit_jax.convert weights/eomt_dinov3_l_coco eomt_l_delta.bin --to eomt-official \
      --delta_from dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth
"""

from __future__ import annotations

import sys
from typing import Any, Mapping, Sequence

from absl import app, flags

from segvit_jax import bundle, convert, runtime
from segvit_jax.convert import eomt, segformer
from segvit_jax.models import layers

PROG = "python -m segvit_jax.convert"
USAGE = f"usage: {PROG} SRC OUT (--from FORMAT | --to FORMAT) [flags]"
# The dash spellings of earlier versions -> the flags they are aliases of.
ALIASES = {"image-size": "image_size", "patch-size": "patch_size",
           "posemb-resize": "posemb_resize", "patch-resize": "patch_resize",
           "num-heads": "num_heads", "trust-pickle": "trust_pickle"}
# Flags of backbone conversions only (a whole model keeps its stored grids).
BACKBONE_ONLY = ("image_size", "patch_size", "posemb_resize", "num_heads", "mean", "std",
                 "patch_resize")


class _SizeParser(flags.ArgumentParser):
  """H or HxW (also H,W) -> int or (H, W)."""

  syntactic_help = "H or HxW"

  def parse(self, argument):
    if not isinstance(argument, str):
      return argument
    try:
      parts = [int(p) for p in argument.lower().replace("x", ",").split(",")]
    except ValueError:
      parts = []
    if len(parts) not in (1, 2):
      raise ValueError(f"{argument!r} is not H or HxW")
    return parts[0] if len(parts) == 1 else tuple(parts)

  def flag_type(self):
    return "size"


class _FloatsParser(flags.ArgumentParser):
  """Comma-separated floats -> a tuple."""

  syntactic_help = "comma-separated floats"

  def parse(self, argument):
    if not isinstance(argument, str):
      return argument
    return tuple(float(v) for v in argument.split(","))

  def flag_type(self):
    return "floats"


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> tuple[str, ...]:
  """Defines the converter's flags (and the old dash spellings as aliases) in `fv` (`cli` has
  `runtime.run` define them once in the process's flags); returns their names in the order
  --help lists them."""
  formats = convert.FORMAT_TABLE
  flags.DEFINE_enum("from", None, [*convert.FORMATS, *convert.MODEL_FORMATS],
                    "layout of SRC, a ViT backbone or a whole model (formats above)",
                    flag_values=fv)
  flags.DEFINE_enum("to", None, list(convert.EXPORT_FORMATS),
                    "write the whole-model bundle SRC in this layout (instead of --from)",
                    flag_values=fv)
  required = list(convert.CONFIG_REQUIRED)
  optional = [n for n, f in formats.items() if f.config == "optional"]
  flags.DEFINE_string(
      "config", None,
      f"our config of the checkpoint's model, configs/X.py[:ARG]: needed by --from "
      f"{', '.join(required)} (tap layers, shrink_idx, heads, classes, mean/std); optional "
      f"with {', '.join(optional)} (class names, mean/std, what the file does not record; its "
      "model must agree with the file)", flag_values=fv)
  flags.DEFINE(_SizeParser(), "image_size", None,
               "resample the stored position grid for this input size (H or HxW)",
               flag_values=fv)
  flags.DEFINE_integer("patch_size", None,
                       "resample the patch kernel to this size (FlexiViT pseudo-inverse)",
                       flag_values=fv)
  flags.DEFINE_enum("posemb_resize", None, list(layers.RESIZE_METHODS),
                    "position-embedding resize method, at conversion and at run time (default: "
                    "the method of the implementation SRC comes from)", flag_values=fv)
  flags.DEFINE_enum("patch_resize", None, list(layers.RESIZE_METHODS),
                    "resize whose pseudo-inverse resamples the patch kernel (default "
                    "bicubic_antialias, as timm / EoMT)", flag_values=fv)
  flags.DEFINE_integer("num_heads", None,
                       "attention heads, for non-standard widths in layouts that do not record "
                       "them", flag_values=fv)
  flags.DEFINE(_FloatsParser(), "mean", None,
               "pixel mean (0-255, comma-separated) the weights expect, when the default of the "
               "format is wrong", flag_values=fv)
  flags.DEFINE(_FloatsParser(), "std", None, "pixel std, as --mean", flag_values=fv)
  flags.DEFINE_bool("trust_pickle", False,
                    "allow .pth files that pickle Python objects besides tensors (runs their "
                    "unpickling code: only for files you trust)", flag_values=fv)
  delta = ", ".join(convert.DELTA_FORMATS)
  flags.DEFINE_string("backbone", None,
                      f"with --from {delta}: the DINOv3 ViT a delta-weight file (the release's "
                      "DINOv3 models) was fine-tuned from, added back: the facebookresearch/"
                      "dinov3 .pth, a transformers DINOv3ViTModel directory or a backbone bundle",
                      flag_values=fv)
  flags.DEFINE_string("delta_from", None,
                      f"with --to {delta}: write delta weights against this DINOv3 ViT (as "
                      "--backbone), as the release's DINOv3 checkpoints", flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "replace OUT if it exists (a bundle, a file or a "
                    "non-empty directory); without it an existing OUT is an error",
                    flag_values=fv)
  for alias, name in ALIASES.items():
    flags.DEFINE_alias(alias, name, flag_values=fv)
  return ("from", "to", "config", "image_size", "patch_size", "posemb_resize", "patch_resize",
          "num_heads", "mean", "std", "trust_pickle", "backbone", "delta_from", "overwrite")


def formats_help() -> str:
  """The formats of `convert.FORMAT_TABLE`, one line each, for --help."""
  lines = ["formats:"]
  for name, f in convert.FORMAT_TABLE.items():
    notes = [f"--config {f.config}"] if f.config != "no" else []
    notes += ["--to"] if f.export is not None else []
    notes = f" [{', '.join(notes)}]" if notes else ""
    lines.append(f"  {name:<19} {f.kind}: {f.help}{notes}")
  return "\n".join(lines)


def _spelled(fv: flags.FlagValues, name: str) -> str:
  """A flag as the user wrote it (its old dash spelling, if that is what was used)."""
  alias = next((a for a, n in ALIASES.items() if n == name), None)
  return f"--{alias}" if alias and fv[alias].present else f"--{name}"


def _model_summary(m: Mapping[str, Any]) -> str:
  if m.get("name") == "segformer":
    return segformer.summary(m)
  if m.get("name") == "eomt":
    return eomt.summary(m)
  bb, head = m["backbone"], m["head"]
  kind = head.get("type", "atm")
  text = (f"SegViT{'-Shrunk' if kind == 'shrunk' else ''} {bb.get('variant') or 'ViT'} "
          f"grid {tuple(bb['posemb_grid'])} taps {tuple(head['tap_layers'])}")
  if kind == "shrunk":
    text += f" shrink_idx {bb.get('shrink_idx')} query grid {tuple(head['query_grid'])}"
  return text + f" head width {head['width']} classes {m['num_classes']}"


def run(fv: flags.FlagValues, src: str, out: str) -> str:
  """Does what the parsed flags `fv` say with SRC and OUT; returns the line to print."""
  fmt, to = fv["from"].value, fv["to"].value
  if (fmt is None) == (to is None):
    raise ValueError("give exactly one of --from FORMAT (convert SRC into a bundle) and --to "
                     "FORMAT (write the bundle SRC in another layout)")
  whole = to is not None or fmt in convert.MODEL_FORMATS
  given = [_spelled(fv, k) for k in BACKBONE_ONLY if fv[k].value is not None]
  if whole and given:
    raise ValueError(f"{', '.join(given)} apply to backbone formats only; a whole model keeps "
                     "its stored grids (the model resizes them at run time)")
  config, trust_pickle = fv["config"].value, fv["trust_pickle"].value
  base, delta_from = fv["backbone"].value, fv["delta_from"].value
  if base is not None and to is not None:
    raise ValueError("--backbone applies to --from (a delta-weight file); --to writes delta "
                     "weights with --delta_from")
  if delta_from is not None and to is None:
    raise ValueError("--delta_from applies to --to; a delta-weight file is read with --from "
                     "... --backbone")
  if base is not None and not whole:
    raise ValueError(f"--backbone applies to whole-model formats with delta-weight files "
                     f"({', '.join(convert.DELTA_FORMATS)}), not the backbone format {fmt}")
  runtime.refuse_overwrite(out, fv["overwrite"].value)  # before the conversion's work
  if to is not None:
    if config or trust_pickle:
      raise ValueError("--config and --trust-pickle apply to --from only (the bundle records "
                       "its model)")
    path = convert.export(src, out, to, delta_from=delta_from)
    form = f" (delta weights against {delta_from})" if delta_from else ""
    return (f"wrote {path}: {_model_summary(bundle.read_config(src)['model'])} in the {to} "
            f"layout{form}")
  if whole:
    if not config and fmt in convert.CONFIG_REQUIRED:
      raise ValueError(f"--from {fmt} needs --config configs/X.py[:ARG]: the checkpoint "
                       "does not record tap layers, shrink_idx, head counts or classes")
    path = convert.convert_model(src, out, fmt, config, trust_pickle=trust_pickle,
                                 backbone=base)
    form = f" (delta weights + {base})" if base else ""
    return f"wrote {path}: {_model_summary(bundle.read_config(path)['model'])}{form}"
  if config:
    optional = [f for f in convert.MODEL_FORMATS if f not in convert.CONFIG_REQUIRED]
    raise ValueError(f"--config applies to whole-model formats "
                     f"({', '.join(convert.CONFIG_REQUIRED)}), not --from {fmt}; "
                     f"optional with {', '.join(optional)}")
  path = convert.convert(
      src, out, fmt, image_size=fv["image_size"].value, patch_size=fv["patch_size"].value,
      posemb_resize=fv["posemb_resize"].value,
      patch_resize=fv["patch_resize"].value or "bicubic_antialias",
      num_heads=fv["num_heads"].value, mean=fv["mean"].value, std=fv["std"].value,
      trust_pickle=trust_pickle)
  b = bundle.read_config(path)["model"]["backbone"]
  position = (f"rope_theta {b['rope_theta']:g}" if b.get("rope_theta") is not None
              else f"posemb_resize {b['posemb_resize']}")
  return (f"wrote {path}: {b.get('variant') or 'ViT'} width {b['width']} depth {b['depth']} "
          f"patch {b['patch_size']} grid {tuple(b['posemb_grid'])} "
          f"registers {b['num_registers']} {position}")


def main(argv: Sequence[str]) -> None:
  """absl's main: `argv` is the program name, SRC and OUT (the flags are parsed)."""
  if len(argv) != 3:
    positional = argv[1:]
    raise app.UsageError(f"expected SRC and OUT, got {len(positional)} argument(s)"
                         f"{': ' + ' '.join(positional) if positional else ''}; {USAGE}")
  try:
    print(run(flags.FLAGS, *argv[1:]))
  except ImportError as e:  # reading .pth files needs torch: the message says how to get it
    raise app.UsageError(str(e)) from None


def cli(argv: Sequence[str] | None = None) -> int:
  """The command line (`argv` without the program name; default sys.argv[1:]): 0 on success,
  1 with one line on stderr for a user's mistake; --help / -h lists the formats and the flags
  and exits 0 (`runtime.run`)."""
  return runtime.run(main, argv, define_flags=define_flags, help_epilog=formats_help)


if __name__ == "__main__":
  sys.exit(cli())
