"""Pieces shared by every config: the run skeleton, SegViT model blocks and the paper recipe.

Every number the code uses comes from a config; the code holds no paper constants. Config
names that later work relies on: `total_steps`, `batch_size` (global), `grad_accum_steps`,
`seed`, `log_every`, `ckpt_every`, `eval_every`, `dataset.name`, `dataset.root`,
`mesh.{data,fsdp,tensor}`, `model_init`.
"""

import ml_collections

# ViT-B / ViT-L SegViT heads (spec segvit.md, "ATM head" table).
ATM_HEADS = {
    "B/16": dict(tap_layers=(5, 7, 11), width=384, num_heads=12, layers_per_stage=3),
    "L/16": dict(tap_layers=(7, 15, 23), width=512, num_heads=16, layers_per_stage=3),
}
DROP_PATH = {"B/16": 0.1, "L/16": 0.3}

# The AugReg weights SegViT starts from (spec segvit.md: i21k -> in1k at 384 px; timm names
# vit_{base,large}_patch16_384.augreg_in21k_ft_in1k), as published in gs://vit_models/augreg/.
AUGREG_FILES = {
    "B/16": "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-"
            "lr_0.01-res_384.npz",
    "L/16": "L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-"
            "lr_0.01-res_384.npz",
}


def run_config() -> ml_collections.ConfigDict:
  """The skeleton every training/evaluation config fills in."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 160_000
  c.batch_size = 16  # global, across all devices and hosts
  # Micro-batches per step: the global batch is split into this many parts that run one after
  # the other inside the step (gradients summed, one optimizer update), so a batch needs about
  # 1 / grad_accum_steps of the activation memory. batch_size must divide by
  # grad_accum_steps x the batch shards (mesh data x fsdp).
  c.grad_accum_steps = 1
  c.log_every = 50
  c.ckpt_every = 4000
  c.keep_ckpts = 3
  c.eval_every = 16_000  # 0 disables evaluation during training
  # Pretrained weights: "" (from scratch), a bundle (whole model or backbone), or a foreign
  # backbone checkpoint in `model_init_format` (segvit_jax.convert.FORMATS), converted and
  # resized to the model on load.
  c.model_init = ""
  c.model_init_format = "bundle"

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1: all remaining

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "synthetic"
  c.dataset.root = ""
  c.dataset.num_classes = 6
  c.dataset.ignore_index = 255
  c.dataset.reduce_zero_label = False
  c.dataset.train_split = "train"
  c.dataset.eval_split = "val"
  c.dataset.num_workers = 0  # grain worker processes for training data (0: in-process)
  c.dataset.prefetch = 2
  # A training example that fails to read (undecodable image, label size mismatch, label out of
  # range): False stops the run with the error naming the file; True skips it with a warning
  # naming the file and goes on (segvit_jax.data.pipeline.SkipBadExamples). Find them all first
  # with `python -m segvit_jax.data.check --config ...`.
  c.dataset.skip_bad_examples = False
  # Only used by the synthetic set.
  c.dataset.image_size = 128
  c.dataset.num_train = 2000
  c.dataset.num_eval = 100

  # Train augmentation. "segvit": mmseg's (spec segvit.md, "Train augmentation"); "eomt":
  # EoMT's colour jitter, flip, scale jitter, pad, random crop (spec eomt.md, "Optimisation").
  c.augment = ml_collections.ConfigDict()
  c.augment.pipeline = "segvit"
  c.augment.crop_size = (512, 512)  # both pipelines
  c.augment.flip_prob = 0.5  # both pipelines
  # "segvit" only.
  c.augment.scale = (2048, 512)  # keep-ratio base scale (long, short)
  c.augment.ratio_range = (0.5, 2.0)
  c.augment.cat_max_ratio = 0.75
  c.augment.photometric = True
  # "eomt" only. Scale jitter: the image is resized keeping its ratio by a factor uniform in
  # this range times crop / long side; EoMT: (0.5, 2.0) semantic, (0.1, 2.0) panoptic/instance.
  c.augment.scale_jitter = (0.5, 2.0)
  # Colour jitter: EoMT uses it on ADE20K and Cityscapes, not on COCO. The factors follow EoMT's
  # `Transforms` (torchvision functional ops): brightness x U(1 -+ 32/255), contrast and
  # saturation x U(1 -+ 0.5), hue shift U(-+18/360) turns; each with p 0.5.
  c.augment.color_jitter = True
  c.augment.jitter_brightness = 32 / 255
  c.augment.jitter_contrast = 0.5
  c.augment.jitter_saturation = 0.5
  c.augment.jitter_hue = 18 / 360

  # Pixel normalisation: AugReg weights expect [-1, 1].
  c.mean = (127.5, 127.5, 127.5)
  c.std = (127.5, 127.5, 127.5)

  c.model = ml_collections.ConfigDict()
  c.loss = atm_loss_config()
  c.optim = optim_config()

  c.eval = ml_collections.ConfigDict()
  # Test protocol (segvit_jax.evaluation; eval.py --scales / --flip set scales / flip).
  # Test resize: "keep_ratio" to scale (long, short) (mmseg: SegViT), "keep_ratio_aligned" (the
  # same, sides rounded up to size_divisor: SegFormer ADE20K), "short_side" (shorter side to
  # scale = the crop: EoMT), "none"; an empty scale keeps the image as it is.
  c.eval.resize = "keep_ratio"
  c.eval.scale = (2048, 512)
  c.eval.size_divisor = 32
  # mmseg 0.x Resize(min_size=...) with keep_ratio: the short side becomes max(short * ratio,
  # min_size), the long side uncapped (SegViT's COCO-Stuff / PASCAL-Context test); 0: off.
  c.eval.min_size = 0
  c.eval.scales = (1.0,)  # multi-scale ratios, e.g. (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
  c.eval.flip = False  # also predict the mirrored image
  # Windows: "slide" (mmseg grid, crop_size / stride), "spread" (EoMT: ceil(side / crop)
  # evenly spread windows), "whole" (the image, padded to the patch size).
  c.eval.mode = "slide"
  c.eval.crop_size = (512, 512)
  c.eval.stride = (341, 341)
  # Views (scales x flips) combine as "softmax" probabilities (mmseg) or raw "scores" (mask
  # classification: EoMT, Mask2Former).
  c.eval.average = "softmax"
  # Also report metrics without class 0 (mIoU59 of a 60-class PASCAL-Context model); None:
  # automatic (pascal_context with 60 classes).
  c.eval.background_free_metrics = None
  c.eval.window_batch = 8  # windows per model call
  c.eval.bucket = 64  # image buffers are padded to multiples of this (fewer compilations)
  c.eval.num_threads = 4  # reading / resizing threads ahead of the device
  c.eval.max_examples = -1  # -1: the whole split
  # What to evaluate (segvit_jax.evaluation): "semantic" (mIoU), or for mask-classification
  # models (EoMT) "panoptic" (PQ / SQ / RQ, plus COCO mask AP of the things with instance_ap)
  # or "instance" (mask AP). Those test with resize "long_side" (scale = the model input), one
  # image per window (window_batch images per model call), and the post-processing of
  # segvit_jax.evaluation.panoptic with EoMT's / Mask2Former's COCO thresholds: queries kept above
  # object_mask_threshold, segments kept if >= overlap_threshold of their own mask survives,
  # top_k (query, class) detections per image for AP.
  c.eval.task = "semantic"
  c.eval.object_mask_threshold = 0.8
  c.eval.overlap_threshold = 0.8
  c.eval.top_k = 100
  c.eval.instance_ap = True
  # Evaluations during training keep the parameters of the best one as a bundle in WORKDIR/best/
  # (its record in WORKDIR/best.json): the evaluation result compared, higher is better;
  # "" keeps none.
  c.eval.best_metric = "mIoU"
  return c


def set_dataset(c: ml_collections.ConfigDict, recipe: dict, num_classes: int | None = None,
                name: str | None = None) -> None:
  """Fills `c.dataset` from a recipe entry (name, root, num_classes, reduce_zero_label)."""
  c.dataset.name = name or recipe["name"]
  c.dataset.root = recipe["root"]
  c.dataset.num_classes = num_classes or recipe["num_classes"]
  c.dataset.reduce_zero_label = recipe["reduce_zero_label"]
  c.dataset.num_workers = 8


def segvit_model_config(variant: str, num_classes: int, drop_path: float | None = None):
  """SegViT = plain ViT backbone (cls token dropped before the blocks) + ATM head."""
  m = ml_collections.ConfigDict()
  m.name = "segvit"
  m.num_classes = num_classes
  m.backbone = ml_collections.ConfigDict(dict(
      variant=variant,
      drop_path=DROP_PATH.get(variant, 0.0) if drop_path is None else drop_path,
      cls_in_blocks=False,
      posemb_grid=(32, 32),  # stored grid (crop / patch); resized to other inputs on the fly
      # Recompute block activations in the backward pass (less memory, ~1/3 more compute);
      # remat_policy names what is kept: nothing_saveable, dots_saveable,
      # dots_with_no_batch_dims_saveable or everything_saveable (jax.checkpoint_policies).
      remat=False,
      remat_policy="nothing_saveable",
      # nn.scan over the blocks: one compiled block (faster compiles for deep models), block
      # params stacked on a leading depth axis. Same outputs; checkpoints of either layout
      # resume either way, bundles always store the unstacked layout.
      scan_layers=False,
  ))
  m.head = ml_collections.ConfigDict(dict(ATM_HEADS.get(variant, ATM_HEADS["B/16"])))
  m.head.dropout = 0.1
  m.dtype = "float32"
  return m


def atm_loss_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      ce_weight=1.0,
      no_object_weight=0.1,
      focal_weight=20.0,
      focal_alpha=0.25,
      focal_gamma=2.0,
      dice_weight=1.0,
      ignore_in_masks=False,  # True excludes ignore pixels from focal/dice (reference: False)
  ))


def optim_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      lr=2e-5,
      lr_mults={"head": 10.0},  # per top-level module: every decoder parameter x10
      weight_decay=0.01,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      no_decay=(r"^backbone/.*norm",),  # regexes on '/'-joined parameter paths
      clip_norm=35.0,
      warmup_steps=1500,
      warmup_ratio=1e-6,
      poly_power=1.0,
      min_lr=0.0,
  ))


# The paper's per-dataset recipes (spec segvit.md, "Training recipes"; the released configs for
# what the spec leaves open): crop and slide stride per ViT size, iterations, weight decay,
# poly power, classes, train base scale and test resize. The ATM and Shrunk models share them.
SEGVIT_RECIPES = {
    "ade20k": dict(
        name="ade20k", root="data/ADEChallengeData2016", num_classes=150,
        reduce_zero_label=True, crop={"B/16": 512, "L/16": 640},
        stride={"B/16": 341, "L/16": 608}, steps=160_000, weight_decay=0.01, poly_power=1.0,
        scale=None, test_min_size=0),
    # The release tests with mmseg's Resize(min_size=512): short side 512 (x ratio, at least
    # 512), long side uncapped.
    "coco_stuff10k": dict(
        name="coco_stuff10k", root="data/coco_stuff10k", num_classes=171,
        reduce_zero_label=False, crop={"B/16": 512, "L/16": 512},
        stride={"B/16": 341, "L/16": 341}, steps=80_000, weight_decay=0.02, poly_power=2.0,
        scale=None, test_min_size=512),
    # The release trains and tests PASCAL-Context at base scale (520, 520), not (2048, crop),
    # and tests with Resize(min_size=480): short side max(520 x ratio, 480).
    "pascal_context": dict(
        name="pascal_context", root="data/VOCdevkit/VOC2010", num_classes=60,
        reduce_zero_label=False, crop={"B/16": 480, "L/16": 480},
        stride={"B/16": 320, "L/16": 320}, steps=80_000, weight_decay=0.03, poly_power=1.0,
        scale=(520, 520), test_min_size=480),
}

# SegViT-Shrunk (spec segvit.md, "Shrunk structure"): query down-sampling at `shrink_idx`,
# QU reading `tap_layers` shallow first, then a single-stage ATM head; widths as the ATM heads.
SHRUNK = {
    "B/16": dict(shrink_idx=6, tap_layers=(5, 11)),
    "L/16": dict(shrink_idx=8, tap_layers=(7, 23)),
}


def shrunk_model_config(variant: str, num_classes: int, crop: int,
                        drop_path: float | None = None) -> ml_collections.ConfigDict:
  """SegViT-Shrunk: the ViT with query down-sampling + QU + single-stage ATM head. The QU
  query grid is stored at crop / patch and resized to other inputs on the fly."""
  m = segvit_model_config(variant, num_classes, drop_path)
  atm = ATM_HEADS[variant]
  patch = int(variant.split("/")[1])
  m.backbone.shrink_idx = SHRUNK[variant]["shrink_idx"]
  m.head = ml_collections.ConfigDict(dict(
      type="shrunk", tap_layers=SHRUNK[variant]["tap_layers"], width=atm["width"],
      num_heads=atm["num_heads"], query_grid=(crop // patch, crop // patch), qu_layers=3,
      atm_layers=3, dropout=0.1))
  return m


def segvit_config(variant: str, dataset: str, *, shrunk: bool = False,
                  pascal_classes: int = 60) -> ml_collections.ConfigDict:
  """The paper's recipe for SegViT (or SegViT-Shrunk) with a ViT `variant` on `dataset` (a
  SEGVIT_RECIPES key). PASCAL-Context: 60 classes (background a class; mIoU59 reported beside
  mIoU60) or 59 (background ignored in training)."""
  r = SEGVIT_RECIPES[dataset]
  crop, stride = r["crop"][variant], r["stride"][variant]
  num_classes = r["num_classes"]
  c = run_config()
  c.total_steps = r["steps"]
  c.batch_size = 16
  name = r["name"]
  if dataset == "pascal_context":
    if pascal_classes not in (59, 60):
      raise ValueError(f"PASCAL-Context has 60 or 59 classes, not {pascal_classes!r}")
    num_classes = pascal_classes
    name = "pascal_context" if pascal_classes == 60 else "pascal_context59"
  set_dataset(c, r, num_classes, name)
  scale = tuple(r["scale"] or (2048, crop))
  c.augment.crop_size = (crop, crop)
  c.augment.scale = scale
  if shrunk:
    c.model = shrunk_model_config(variant, num_classes, crop)
  else:
    c.model = segvit_model_config(variant, num_classes)
  c.model_init = f"weights/{AUGREG_FILES[variant]}"
  c.model_init_format = "augreg-npz"
  patch = int(variant.split("/")[1])
  c.model.backbone.posemb_grid = (crop // patch, crop // patch)
  c.optim.weight_decay = r["weight_decay"]
  c.optim.poly_power = r["poly_power"]
  c.eval.mode = "slide"
  c.eval.crop_size = (crop, crop)
  c.eval.stride = (stride, stride)
  c.eval.scale = scale
  c.eval.min_size = r["test_min_size"]
  return c



# SegFormer (spec segformer.md): MiT variant -> decoder width; the paper's recipe per dataset
# (crop, train base scale, test protocol, batch), as the NVlabs release configures it.
SEGFORMER_HEAD_WIDTH = {"B0": 256, "B1": 256, "B2": 768, "B3": 768, "B4": 768, "B5": 768}
IMAGENET_MEAN_STD = ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
SEGFORMER_RECIPES = {
    # ADE20K: whole-image test at the keep-ratio (2048, crop) size rounded up to 32
    # (AlignedResize); B5 trains and tests at 640.
    "ade20k": dict(name="ade20k", root="data/ADEChallengeData2016", num_classes=150,
                   reduce_zero_label=True, batch=16, eval_mode="whole",
                   eval_resize="keep_ratio_aligned"),
    # Cityscapes: 1024 crops of (2048, 1024) images, sliding-window test 1024 / 768.
    "cityscapes": dict(name="cityscapes", root="data/cityscapes", num_classes=19,
                       reduce_zero_label=False, batch=8, eval_mode="slide",
                       eval_resize="keep_ratio"),
}


def segformer_crop(variant: str, dataset: str) -> int:
  if dataset == "cityscapes":
    return 1024
  return 640 if variant == "B5" else 512


def segformer_config(variant: str, dataset: str) -> ml_collections.ConfigDict:
  """SegFormer-`variant` (B0..B5) on `dataset` (SEGFORMER_RECIPES) with the paper's recipe:
  AdamW lr 6e-5, weight decay 0.01 (none on backbone norms), decoder lr x10, poly power 1
  with 1500 linear warm-up iterations, no gradient clipping, 160k iterations, mmseg's
  augmentation (scale 0.5-2.0 of (2048, crop), cat_max_ratio 0.75 crop, flip, photometric),
  ImageNet pixel statistics, per-pixel cross-entropy. Starts from the ImageNet MiT encoder
  `weights/mit_bX.pth` of the release (README, "Pretrained weights")."""
  r = SEGFORMER_RECIPES[dataset]
  crop = segformer_crop(variant, dataset)
  c = run_config()
  c.total_steps = 160_000
  c.batch_size = r["batch"]
  set_dataset(c, r)
  c.mean, c.std = IMAGENET_MEAN_STD
  c.augment.crop_size = (crop, crop)
  c.augment.scale = (2048, crop)
  c.model = ml_collections.ConfigDict(dict(
      name="segformer", num_classes=r["num_classes"], dtype="float32",
      backbone=dict(variant=variant, drop_path=0.1, norm_eps=1e-6),
      head=dict(width=SEGFORMER_HEAD_WIDTH[variant], dropout=0.1)))
  c.model_init = f"weights/mit_{variant.lower()}.pth"
  c.model_init_format = "segformer-official"
  c.loss = ml_collections.ConfigDict(dict(name="pixel_ce", ce_weight=1.0,
                                          avg_non_ignore=False))
  c.optim.lr = 6e-5
  c.optim.weight_decay = 0.01
  c.optim.clip_norm = 0.0  # none
  c.optim.poly_power = 1.0
  c.eval.mode = r["eval_mode"]
  c.eval.resize = r["eval_resize"]
  c.eval.scale = (2048, crop)
  c.eval.size_divisor = 32
  c.eval.crop_size = (crop, crop)
  c.eval.stride = (768, 768) if dataset == "cityscapes" else (crop * 2 // 3, crop * 2 // 3)
  return c


def segvit_mit_config(variant: str = "B2") -> ml_collections.ConfigDict:
  """SegViT's ATM head on a SegFormer MiT encoder (the SegViT paper's hierarchical-backbone
  variant) on ADE20K: SegFormer's ADE20K recipe and test protocol, the ATM loss; the head
  reads stages 4, 3, 2 (strides 32, 16, 8; masks summed on the 1/8 grid)."""
  c = segformer_config(variant, "ade20k")
  c.model = ml_collections.ConfigDict(dict(
      name="segvit", num_classes=150, dtype="float32",
      backbone=dict(type="mit", variant=variant, drop_path=0.1, norm_eps=1e-6),
      head=dict(tap_layers=(1, 2, 3), width=256, num_heads=8, layers_per_stage=3,
                dropout=0.1)))
  c.loss = atm_loss_config()
  c.eval.average = "softmax"
  return c


# EoMT (spec eomt.md): DINOv2 with 4 registers run at patch 16, K queries in the last L2
# blocks, Mask2Former loss, EoMT's optimisation and semantic inference.
EOMT_RECIPES = {
    # images / global batch 16 x epochs.
    "ade20k": dict(name="ade20k", root="data/ADEChallengeData2016", num_classes=150,
                   reduce_zero_label=True, crop=512, steps=39_120, color_jitter=True,
                   scale_jitter=(0.5, 2.0),
                   annealing={"L": ((6520, 13040, 19560, 26080),
                                    (13040, 19560, 26080, 32600))}),
    "cityscapes": dict(name="cityscapes", root="data/cityscapes", num_classes=19,
                       reduce_zero_label=False, crop=1024, steps=19_902, color_jitter=True,
                       scale_jitter=(0.5, 2.0),
                       annealing={"L": ((3317, 6634, 9951, 13268),
                                        (6634, 9951, 13268, 16585))}),
    # 118,287 train2017 images, 12 epochs at batch 16: 6 x 14,782 = 88,692 steps (12 x 7,391),
    # the total behind the release's ViT-L windows (each 1/6 of the run, as
    # `annealing_windows`). Large-scale jitter, no colour jitter. `max_segments`: segments per
    # training image in the batch (thing instances and stuff regions, crowd dropped);
    # training checks the json against it before it starts.
    "coco_panoptic": dict(name="coco_panoptic", root="data/coco", num_classes=133,
                          reduce_zero_label=False, crop=640, steps=88_692, color_jitter=False,
                          scale_jitter=(0.1, 2.0), max_segments=100,
                          annealing={"L": ((14782, 29564, 44346, 59128),
                                           (29564, 44346, 59128, 73910))}),
}
# Blocks that see the queries (L2) per size (spec eomt.md, "Backbone").
EOMT_NUM_BLOCKS = {"S": 3, "B": 3, "L": 4, "g": 5}
# DINOv2 release files (README, "Pretrained weights"), converted and resized on load.
DINOV2_FILES = {s: f"weights/dinov2_vit{s.lower()}14_reg4_pretrain.pth" for s in "SBLg"}


def annealing_windows(total_steps: int, num_blocks: int) -> tuple[tuple[int, ...],
                                                                  tuple[int, ...]]:
  """The release's annealing windows when none are given: the run split into L2 + 2 equal
  parts, block i annealed over part i + 1 (its published ViT-L windows follow this rule)."""
  part = total_steps // (num_blocks + 2)
  return (tuple(part * (i + 1) for i in range(num_blocks)),
          tuple(part * (i + 2) for i in range(num_blocks)))


def eomt_config(size: str, dataset: str, num_queries: int = 100,
                crop: int | None = None) -> ml_collections.ConfigDict:
  """EoMT-`size` (S, B, L, g) semantic segmentation on `dataset` (EOMT_RECIPES): AdamW lr 1e-4,
  weight decay 0.05 on every parameter, clip 0.01, layer-wise lr decay 0.8, two-stage warm-up
  (500 steps heads only, then 1000 for the ViT) and poly 0.9, batch 16, bfloat16 compute;
  colour jitter, flip, scale jitter 0.5-2.0, crop; Mask2Former loss (12544 points, weights
  2 / 5 / 5, no-object 0.1); test: shorter side to the crop, evenly spread square windows.
  `crop`: the input size, if not the recipe's."""
  r = EOMT_RECIPES[dataset]
  crop, l2 = crop or r["crop"], EOMT_NUM_BLOCKS[size]
  c = run_config()
  c.total_steps = r["steps"]
  c.batch_size = 16
  set_dataset(c, r)
  c.mean, c.std = IMAGENET_MEAN_STD
  c.augment.pipeline = "eomt"
  c.augment.crop_size = (crop, crop)
  c.augment.scale_jitter = r["scale_jitter"]
  c.augment.color_jitter = r["color_jitter"]
  starts, ends = r["annealing"].get(size, annealing_windows(r["steps"], l2))
  c.model = ml_collections.ConfigDict(dict(
      name="eomt", num_classes=r["num_classes"], num_queries=num_queries, num_blocks=l2,
      dtype="bfloat16",
      backbone=dict(variant=f"dinov2-{size}/14-reg4", patch_size=16,
                    posemb_grid=(crop // 16, crop // 16), posemb_resize="bicubic_antialias",
                    drop_path=0.0),
      mask_annealing=dict(enabled=True, start_steps=starts, end_steps=ends, power=0.9)))
  c.model_init = DINOV2_FILES[size]
  c.model_init_format = "dinov2"
  c.loss = ml_collections.ConfigDict(dict(
      name="mask2former", num_queries=num_queries, num_points=12544, oversample_ratio=3.0,
      importance_ratio=0.75, no_object_weight=0.1, class_weight=2.0, mask_weight=5.0,
      dice_weight=5.0))
  c.optim = optim_config()
  c.optim.update(schedule="two_stage", lr=1e-4, weight_decay=0.05, no_decay=(),
                 clip_norm=0.01, warmup_steps=500, backbone_warmup_steps=1000,
                 poly_power=0.9, layer_decay=0.8)
  c.optim.lr_mults = {}
  c.eval.resize = "short_side"
  c.eval.scale = (crop, crop)
  c.eval.mode = "spread"
  c.eval.crop_size = (crop, crop)
  c.eval.stride = (crop, crop)
  c.eval.average = "scores"
  return c


def eomt_panoptic_config(size: str, image_size: int = 640) -> ml_collections.ConfigDict:
  """EoMT-`size` (S, B, L, g) panoptic segmentation on COCO at `image_size` (640 or 1280):
  `eomt_config`'s optimisation and model with 200 queries and 133 classes, 12 epochs with the
  release's ViT-L annealing windows (the same rule for the other sizes, and at 1280), flip,
  large-scale jitter 0.1-2.0, pad and crop without colour jitter, the Mask2Former loss on every
  segment (`mask2former_panoptic`: segment-index maps, at most `dataset.max_segments` segments
  per image); test (`config.eval.task`): longer side to the input size, zero-padded square."""
  r = EOMT_RECIPES["coco_panoptic"]
  c = eomt_config(size, "coco_panoptic", num_queries=200, crop=image_size)
  c.dataset.max_segments = r["max_segments"]
  c.loss.name = "mask2former_panoptic"
  c.eval.task = "panoptic"
  c.eval.resize = "long_side"
  c.eval.scale = (image_size, image_size)
  c.eval.best_metric = "PQ"
  return c
