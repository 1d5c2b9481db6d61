"""Converts a pretrained ViT checkpoint into a segvit_jax backbone bundle.

  python -m segvit_jax.convert SRC OUT --from FORMAT [--image-size 640] [--patch-size 16]

Examples (file names of the public releases; see the README, "Pretrained weights"):
  python -m segvit_jax.convert \
      L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_384.npz \
      weights/augreg_l16 --from augreg-npz --image-size 640
  python -m segvit_jax.convert dinov2_vitl14_reg4_pretrain.pth weights/dinov2_l16_640 \
      --from dinov2 --image-size 640 --patch-size 16
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


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m segvit_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("src", help="checkpoint file or (hf-*) save_pretrained directory")
  parser.add_argument("out", help="bundle directory to write")
  parser.add_argument("--from", dest="fmt", required=True, choices=convert.FORMATS,
                      help="layout of SRC")
  parser.add_argument("--image-size", type=_size, default=None,
                      help="resample the stored position grid for this input size (H or HxW)")
  parser.add_argument("--patch-size", type=int, default=None,
                      help="resample the patch kernel to this size (FlexiViT pseudo-inverse)")
  parser.add_argument("--posemb-resize", choices=layers.RESIZE_METHODS, default=None,
                      help="position-embedding resize method, at conversion and at run time "
                           "(default: the method of the implementation SRC comes from)")
  parser.add_argument("--patch-resize", choices=layers.RESIZE_METHODS,
                      default="bicubic_antialias",
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
  try:
    path = convert.convert(
        args.src, args.out, args.fmt, image_size=args.image_size, patch_size=args.patch_size,
        posemb_resize=args.posemb_resize, patch_resize=args.patch_resize,
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
