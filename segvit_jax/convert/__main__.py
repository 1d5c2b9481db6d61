r"""Converts a pretrained ViT checkpoint into a segvit_jax backbone bundle, and whole SegViT,
SegFormer and EoMT models between the authors' releases (and transformers) and our bundles.

  python -m segvit_jax.convert SRC OUT --from FORMAT [--image-size 640] [--patch-size 16]
  python -m segvit_jax.convert SRC.pth OUT --from segvit-official --config configs/X.py[:ARG]
  python -m segvit_jax.convert BUNDLE OUT.pth --to segvit-official
  python -m segvit_jax.convert SRC OUT --from segformer-official|hf-segformer [--config X.py]
  python -m segvit_jax.convert BUNDLE OUT --to segformer-official|hf-segformer
  python -m segvit_jax.convert SRC OUT --from eomt-official|hf-eomt [--config X.py]
  python -m segvit_jax.convert BUNDLE OUT --to eomt-official|hf-eomt

Examples (file names of the public releases; see the README, "Pretrained weights"):
  python -m segvit_jax.convert \
      L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_384.npz \
      weights/augreg_l16 --from augreg-npz --image-size 640
  python -m segvit_jax.convert dinov2_vitl14_reg4_pretrain.pth weights/dinov2_l16_640 \
      --from dinov2 --image-size 640 --patch-size 16
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
"""

from __future__ import annotations

import argparse
import sys

from segvit_jax import convert
from segvit_jax.models import layers


def _size(text: str) -> int | tuple[int, int]:
  parts = [int(p) for p in text.lower().replace("x", ",").split(",")]
  return parts[0] if len(parts) == 1 else tuple(parts)


def _floats(text: str) -> tuple[float, ...]:
  return tuple(float(v) for v in text.split(","))


def _model_summary(m) -> str:
  if m.get("name") == "segformer":
    return convert.segformer.summary(m)
  if m.get("name") == "eomt":
    return convert.eomt.summary(m)
  bb, head = m["backbone"], m["head"]
  kind = head.get("type", "atm")
  text = (f"SegViT{'-Shrunk' if kind == 'shrunk' else ''} {bb.get('variant') or 'ViT'} "
          f"grid {tuple(bb['posemb_grid'])} taps {tuple(head['tap_layers'])}")
  if kind == "shrunk":
    text += f" shrink_idx {bb.get('shrink_idx')} query grid {tuple(head['query_grid'])}"
  return text + f" head width {head['width']} classes {m['num_classes']}"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m segvit_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("src", help="checkpoint file or (hf-*) save_pretrained directory; with "
                      "--to, a whole-model bundle")
  parser.add_argument("out", help="bundle directory to write; with --to, the file to write")
  parser.add_argument("--from", dest="fmt", default=None,
                      choices=convert.FORMATS + convert.MODEL_FORMATS,
                      help="layout of SRC (backbones, or whole models: segvit-official, "
                           "segformer-official, hf-segformer, eomt-official, hf-eomt)")
  parser.add_argument("--to", dest="to", default=None, choices=convert.EXPORT_FORMATS,
                      help="write the bundle SRC in this layout (instead of --from)")
  parser.add_argument("--config", default=None,
                      help="with --from segvit-official: our config of the checkpoint's model, "
                           "configs/X.py[:ARG] (tap layers, shrink_idx, heads, classes, mean/std); "
                           "optional with segformer-official / hf-segformer / eomt-official / "
                           "hf-eomt (class names, mean/std, what the file does not record; its "
                           "model must agree with the file)")
  parser.add_argument("--image-size", type=_size, default=None,
                      help="resample the stored position grid for this input size (H or HxW)")
  parser.add_argument("--patch-size", type=int, default=None,
                      help="resample the patch kernel to this size (FlexiViT pseudo-inverse)")
  parser.add_argument("--posemb-resize", choices=layers.RESIZE_METHODS, default=None,
                      help="position-embedding resize method, at conversion and at run time "
                           "(default: the method of the implementation SRC comes from)")
  parser.add_argument("--patch-resize", choices=layers.RESIZE_METHODS, default=None,
                      help="resize whose pseudo-inverse resamples the patch kernel (default "
                           "bicubic_antialias, as timm / EoMT)")
  parser.add_argument("--num-heads", type=int, default=None,
                      help="attention heads, for non-standard widths in layouts that do not "
                           "record them")
  parser.add_argument("--mean", type=_floats, default=None,
                      help="pixel mean (0-255, comma-separated) the weights expect, when the "
                           "default of the format is wrong")
  parser.add_argument("--std", type=_floats, default=None, help="pixel std, as --mean")
  parser.add_argument("--trust-pickle", action="store_true",
                      help="allow .pth files that pickle Python objects besides tensors "
                           "(runs their unpickling code: only for files you trust)")
  args = parser.parse_args(argv)
  backbone_only = {"--image-size": args.image_size, "--patch-size": args.patch_size,
                   "--posemb-resize": args.posemb_resize, "--num-heads": args.num_heads,
                   "--mean": args.mean, "--std": args.std, "--patch-resize": args.patch_resize}
  try:
    if (args.fmt is None) == (args.to is None):
      raise ValueError("give exactly one of --from FORMAT (convert SRC into a bundle) and --to "
                       "FORMAT (write the bundle SRC in another layout)")
    whole = args.to is not None or args.fmt in convert.MODEL_FORMATS
    given = [k for k, v in backbone_only.items() if v is not None]
    if whole and given:
      raise ValueError(f"{', '.join(given)} apply to backbone formats only; a whole model keeps "
                       "its stored grids (the model resizes them at run time)")
    if args.to is not None:
      if args.config or args.trust_pickle:
        raise ValueError("--config and --trust-pickle apply to --from only (the bundle records "
                         "its model)")
      path = convert.export(args.src, args.out, args.to)
      meta = convert.bundle_lib.read_config(args.src)["model"]
      print(f"wrote {path}: {_model_summary(meta)} in the {args.to} layout")
      return 0
    if whole:
      if not args.config and args.fmt in convert.CONFIG_REQUIRED:
        raise ValueError(f"--from {args.fmt} needs --config configs/X.py[:ARG]: the checkpoint "
                         "does not record tap layers, shrink_idx, head counts or classes")
      path = convert.convert_model(args.src, args.out, args.fmt, args.config,
                                   trust_pickle=args.trust_pickle)
      print(f"wrote {path}: {_model_summary(convert.bundle_lib.read_config(path)['model'])}")
      return 0
    if args.config:
      optional = [f for f in convert.MODEL_FORMATS if f not in convert.CONFIG_REQUIRED]
      raise ValueError(f"--config applies to whole-model formats "
                       f"({', '.join(convert.CONFIG_REQUIRED)}), not --from {args.fmt}; "
                       f"optional with {', '.join(optional)}")
    path = convert.convert(
        args.src, args.out, args.fmt, image_size=args.image_size, patch_size=args.patch_size,
        posemb_resize=args.posemb_resize,
        patch_resize=args.patch_resize or "bicubic_antialias",
        num_heads=args.num_heads, mean=args.mean, std=args.std, trust_pickle=args.trust_pickle)
  except (ValueError, FileNotFoundError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  b = convert.bundle_lib.read_config(path)["model"]["backbone"]
  print(f"wrote {path}: {b.get('variant') or 'ViT'} width {b['width']} depth {b['depth']} "
        f"patch {b['patch_size']} grid {tuple(b['posemb_grid'])} "
        f"registers {b['num_registers']} posemb_resize {b['posemb_resize']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
