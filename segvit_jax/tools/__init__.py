"""The tools mmsegmentation users reach for, one module each (`python -m segvit_jax.tools.X`,
`--help` lists its flags): `plot` (curves of metrics.jsonl keys, several runs overlaid),
`browse` (augmented training samples as the pipeline produces them), `benchmark` (FPS and
latency of a bundle or a config). The parameter count is in `python -m segvit_jax.flops`."""
