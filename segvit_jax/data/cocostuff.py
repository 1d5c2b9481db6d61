"""`python -m segvit_jax.data.cocostuff RAW OUT`: the old name of the COCO-Stuff-10K converter,
`python -m segvit_jax.data.coco_stuff` (kept because earlier instructions show it)."""

import sys

from segvit_jax import runtime
from segvit_jax.data import coco_stuff

if __name__ == "__main__":
  sys.exit(runtime.run(coco_stuff.main, define_flags=coco_stuff.define_flags))
