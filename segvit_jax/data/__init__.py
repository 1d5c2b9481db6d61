"""Data: dataset sources, mmseg-style augmentations and grain pipelines."""

from segvit_jax.data.pipeline import make_eval_dataset
from segvit_jax.data.pipeline import make_train_dataset
from segvit_jax.data.pipeline import make_train_iterator
from segvit_jax.data.sources import get_source
from segvit_jax.data.synthetic import SyntheticSegmentation
