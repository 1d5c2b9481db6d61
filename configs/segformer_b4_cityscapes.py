"""SegFormer-B4 on Cityscapes at 1024x1024 (spec segformer.md, "Results to reproduce").

  python train.py --config configs/segformer_b4_cityscapes.py \
      --workdir runs/segformer_b4_cityscapes \
      --config.dataset.root=/data/cityscapes

Starts from the ImageNet MiT-B4 encoder of the release, weights/mit_b4.pth (README,
"Pretrained weights"). Recipe: AdamW lr 6e-5 (decoder x10), weight decay 0.01, poly power 1
with 1500 warm-up iterations, global batch 8, 160k iterations, per-pixel cross-entropy;
test: sliding window 1024 / 768 on the (2048, 1024) images.
"""

import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  return common.segformer_config("B4", "cityscapes")
