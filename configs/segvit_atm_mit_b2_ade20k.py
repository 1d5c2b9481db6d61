"""SegViT's ATM head on a SegFormer MiT-B2 encoder, ADE20K at 512x512 (SegViT Sec. 4.4, "SegViT
on hierarchical backbones.", Table 6 shows ATM on Swin-T: 47.1 mIoU at 48.0 GFLOPs).

  python train.py --config configs/segvit_atm_mit_b2_ade20k.py --workdir runs/atm_mit_b2_ade \
      --config.dataset.root=/data/ADEChallengeData2016
  python train.py --config configs/segvit_atm_mit_b2_ade20k.py:smoke \
      --workdir /tmp/smoke --config.dataset.root=FABRICATED_COPY

SegFormer's ADE20K recipe and test protocol (configs/segformer_b2_ade20k.py) with SegViT's ATM
head and loss. The argument `smoke` gives common.smoke's variant (the same recipe, a tiny
model). Starts from the ImageNet MiT-B2 encoder of the SegFormer release, weights/mit_b2.pth.
"""

import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in ("", "smoke"):
    raise ValueError(f"unknown config argument {arg!r}: expected '' or 'smoke'")
  c = common.run_config()
  crop = 512  # SegFormer Sec. 4.1, "Implementation details:"

  # ADE20K: 150 classes (SegFormer Sec. 4.1, "Datasets:"), label 0 ("other") ignored (mmseg's
  # ADE20KDataset, reduce_zero_label).
  c.dataset.update(name="ade20k", root="data/ADEChallengeData2016", num_classes=150,
                   reduce_zero_label=True, num_workers=8)

  # Train augmentation: resize by a ratio in [0.5, 2.0], random crop, flip (SegFormer Sec. 4.1);
  # keep-ratio base scale (2048, crop), the crop retried until no class covers > 75% of it,
  # mmseg's photometric distortion (the release's config).
  c.augment.update(
      pipeline="segvit", crop_size=(crop, crop), scale=(2048, crop), ratio_range=(0.5, 2.0),
      cat_max_ratio=0.75, flip_prob=0.5, photometric=True, photometric_brightness=32,
      photometric_contrast=(0.5, 1.5), photometric_saturation=(0.5, 1.5), photometric_hue=18)
  # ImageNet pixel statistics (the SegFormer release's config).
  c.mean, c.std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)

  # Model: the MiT-B2 encoder (SegFormer Sec. 3.1, Table 6; drop path 0.1, LayerNorm eps 1e-6:
  # the SegFormer release's config) and the ATM head reading stages 4, 3, 2 (strides 32, 16, 8;
  # deepest first, each stage's masks summed on the 1/8 grid), width 256, 8 heads, 3 layers per
  # stage (this project's choice: the paper gives no MiT head sizes).
  c.model = common.model_config(dict(
      name="segvit", num_classes=150, dtype="float32",
      backbone=dict(type="mit", variant="B2", drop_path=0.1, norm_eps=1e-6),
      head=dict(tap_layers=(1, 2, 3), width=256, num_heads=8, layers_per_stage=3,
                dropout=0.1)))
  c.model_init = "weights/mit_b2.pth"
  c.model_init_format = "segformer-official"

  # Loss: SegViT's ATM loss (SegViT Sec. 3.2, Eq. (4); weights, focal alpha / gamma and
  # no-object weight: the SegViT release's ATMLoss config).
  c.loss.update(name="atm", ce_weight=1.0, no_object_weight=0.1, focal_weight=20.0,
                focal_alpha=0.25, focal_gamma=2.0, dice_weight=1.0, ignore_in_masks=False)

  # Optimiser: SegFormer's (Sec. 4.1: AdamW lr 6e-5, poly power 1; weight decay 0.01, none on
  # the backbone's norms, decoder lr x10, 1500 warm-up iterations, no clipping: its release).
  c.optim.update(lr=6e-5, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8,
                 no_decay=(r"^backbone/.*norm",), clip_norm=0.0, schedule="warmup_poly",
                 warmup_steps=1500, warmup_ratio=1e-6, poly_power=1.0, min_lr=0.0)
  c.optim.lr_mults = {"head": 10.0}
  c.total_steps = 160_000  # SegFormer Sec. 4.1
  c.batch_size = 16  # SegFormer Sec. 4.1

  # Test: SegFormer's ADE20K protocol, the whole image, short side 512 (SegFormer Sec. 4.1),
  # keeping the ratio within (2048, 512) and rounding the sides up to a multiple of 32 (its
  # release's AlignedResize). The slide stride is unused by the whole-image test.
  c.eval.update(task="semantic", resize="keep_ratio_aligned", scale=(2048, crop), size_divisor=32,
                min_size=0, mode="whole", crop_size=(crop, crop), stride=(341, 341),
                average="softmax")
  return common.smoke(c) if arg == "smoke" else c
