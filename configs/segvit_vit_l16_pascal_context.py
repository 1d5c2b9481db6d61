"""SegViT ViT-L/16 on PASCAL-Context at 480x480: 65.3 mIoU59 multi-scale, 321.6 GFLOPs
(SegViT Table 3; 64.1 single-scale in the release's README).

  python train.py --config configs/segvit_vit_l16_pascal_context.py --workdir runs/l16_context \
      --config.dataset.root=/data/VOCdevkit/VOC2010
  python train.py --config configs/segvit_vit_l16_pascal_context.py:59 ...
  python train.py --config configs/segvit_vit_l16_pascal_context.py:smoke \
      --workdir /tmp/smoke --config.dataset.root=FABRICATED_COPY

60 classes by default (background is a class; evaluation reports mIoU60 and mIoU59, the
paper's number, from the one model); the argument 59 trains without background (ignored).
`smoke` (also `59,smoke`) is common.smoke's variant.

Starts from the AugReg L/16 i21k->in1k 384-px .npz in weights/ (README, "Pretrained
weights"); the 24x24 position grid is resized bicubically on load.
"""

import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  parts = [p for p in arg.split(",") if p]
  if any(p not in ("60", "59", "smoke") for p in parts):
    raise ValueError(f"unknown PASCAL-Context config argument {arg!r}: expected '', '60', '59', "
                     "'smoke' or '59,smoke'")
  num_classes = 59 if "59" in parts else 60
  name = "pascal_context" if num_classes == 60 else "pascal_context59"
  c = common.run_config()
  crop, stride = 480, 320  # SegViT Sec. 4.2 (crop); the release's config (slide stride)

  # PASCAL-Context: 60 classes with background (SegViT Sec. 4.1; mIoU59 and mIoU60 as
  # in SegViT Table 3), or 59 with background ignored in training.
  c.dataset.update(name=name, root="data/VOCdevkit/VOC2010", num_classes=num_classes,
                   reduce_zero_label=False, num_workers=8)

  # Train augmentation: keep-ratio resize by a ratio in [0.5, 2.0], random crop, flip (SegViT
  # Sec. 4.2, "Training settings."); the crop retried until no class covers > 75% of it, mmseg's
  # photometric distortion, base scale (the release's config).
  c.augment.update(
      pipeline="segvit", crop_size=(crop, crop),
      scale=(520, 520),  # the release trains at base scale (520, 520), not (2048, crop)
      ratio_range=(0.5, 2.0), cat_max_ratio=0.75, flip_prob=0.5, photometric=True,
      photometric_brightness=32, photometric_contrast=(0.5, 1.5),
      photometric_saturation=(0.5, 1.5), photometric_hue=18)
  c.mean = c.std = (127.5, 127.5, 127.5)  # AugReg weights take pixels in [-1, 1]

  # Model: the AugReg ViT-L/16 (SegViT Sec. 4.2, "Transformer backbone."), the cls token dropped
  # before the blocks, and the ATM head reading blocks 7, 15, 23 deepest first: 3 stages of 3
  # layers, masks summed over stages (SegViT Sec. 3.2, "The SegViT structure."; the taps: the
  # release's config; SegViT Table 5 ablates ViT-B's). Widths, heads, dropout and drop path: the
  # release's config.
  c.model = common.model_config(dict(
      name="segvit", num_classes=num_classes, dtype="float32",
      backbone=dict(variant="L/16", drop_path=0.3, cls_in_blocks=False,
                    posemb_grid=(30, 30),  # crop / patch, resized to other inputs on the fly
                    **common.vit_memory_knobs(scan_layers=True)),
      head=dict(tap_layers=(7, 15, 23), width=512, num_heads=16, layers_per_stage=3,
                dropout=0.1)))
  c.model_init = ("weights/L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1--imagenet2012-"
                  "steps_20k-lr_0.01-res_384.npz")
  c.model_init_format = "augreg-npz"

  # Loss: query c is class c, no matching; cross-entropy + focal + dice on every stage's output
  # (SegViT Sec. 3.2, Eq. (4)); weights, focal alpha / gamma and no-object weight: the
  # release's ATMLoss config.
  c.loss.update(name="atm", ce_weight=1.0, no_object_weight=0.1, focal_weight=20.0,
                focal_alpha=0.25, focal_gamma=2.0, dice_weight=1.0, ignore_in_masks=False)

  # Optimiser (the release's config): AdamW, decoder lr x10, no weight decay on backbone norms,
  # clip 35, poly with 1500 linear warm-up iterations from 1e-6 x lr.
  c.optim.update(lr=2e-5, weight_decay=0.03, b1=0.9, b2=0.999, eps=1e-8,
                 no_decay=(r"^backbone/.*norm",), clip_norm=35.0, schedule="warmup_poly",
                 warmup_steps=1500, warmup_ratio=1e-6, poly_power=1.0, min_lr=0.0)
  c.optim.lr_mults = {"head": 10.0}
  c.total_steps = 80_000  # SegViT Sec. 4.2
  c.batch_size = 16  # SegViT Sec. 4.2

  # Test (the release's config): keep-ratio resize to (520, 520) with mmseg's
  # Resize(min_size=480) (short side max(520 x ratio, 480)), sliding crop x crop windows
  # every `stride` pixels, window softmax scores averaged. Multi-scale (SegViT Table 3
  # reports it only): eval.py --scales 0.5,0.75,1.0,1.25,1.5,1.75 --flip.
  c.eval.update(task="semantic", resize="keep_ratio", scale=(520, 520), min_size=480,
                mode="slide", crop_size=(crop, crop), stride=(stride, stride),
                average="softmax")
  return common.smoke(c) if "smoke" in parts else c
