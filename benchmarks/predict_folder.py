"""predict.py throughput on a folder of mixed-size photos, as a user waits for it: each given
predict.py (this checkout's by default, or older checkouts' for a before / after) run as a
subprocess on the same folder and the same SegViT ViT-B/16 ADE20K bundle, once per --protocol
value it has, with the persistent compilation cache off.

  python benchmarks/predict_folder.py [--images 12] [--predict PATH[,PATH...]] [--workdir DIR]

The folder holds --images photo-like JPEGs (`benchmarks/data_pipeline.fabricate`'s smooth
colour fields, shapes and noise) cycling through 8 sizes of ADE20K's 683 x 512 class (`SIZES`,
width x height). The bundle is `configs/segvit_vit_b16_ade20k.py`'s model (ViT-B/16 + ATM head,
150 classes) with random weights and that config's test protocol recorded (`eval`: keep-ratio
resize to (2048, 512), 512 px sliding windows, stride 341). A predict.py without --protocol
(older ones) is run plainly; an extra `eval` entry in config.json is ignored by their bundle
reader.

Wall time is from the subprocess's start to its exit (imports, bundle loading, every
compilation, every image and its outputs). Each "[i/N]" line predict.py prints is time-stamped
as it arrives, which splits the wall time into the time to the first image and the rest; jax's
compilation log (JAX_LOG_COMPILES) counts the programs compiled and their seconds. The first
--predict's first run is the reference of the ratio column.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (width, height): ADE20K's typical 683 x 512 and its neighbours (portrait, 4:3, square, 3:2).
SIZES = ((683, 512), (512, 683), (640, 480), (700, 525), (600, 450), (512, 512), (768, 512),
         (720, 540))
IMAGE_LINE = re.compile(r"^\[(\d+)/(\d+)\] ")
COMPILE_LINE = re.compile(r"Finished XLA compilation of (.+?) in ([0-9.]+) sec")
# Building a program: tracing, lowering to MLIR, XLA compilation (each logged with its seconds).
BUILD_LINE = re.compile(r"Finished (?:tracing|jaxpr to MLIR module conversion|XLA compilation)"
                        r" .*? in ([0-9.]+) sec")
PROTOCOL_HELP = re.compile(r"--protocol: <([a-z|]+)>")


def folder_sizes(n: int) -> list[tuple[int, int]]:
  """(width, height) of the n images: `SIZES` in turn."""
  return [SIZES[i % len(SIZES)] for i in range(n)]


def build_folder(path: str, n: int) -> list[str]:
  """n photo-like JPEGs `NN_WxH.jpg` in `path` (made with data_pipeline.fabricate, one call per
  size, its label PNGs dropped); returns their paths."""
  from benchmarks.data_pipeline import fabricate  # pylint: disable=g-import-not-at-top
  os.makedirs(path, exist_ok=True)
  sizes = folder_sizes(n)
  files = []
  with tempfile.TemporaryDirectory() as tmp:
    for k, (w, h) in enumerate(SIZES):
      indices = [i for i, s in enumerate(sizes) if s == (w, h)]
      if not indices:
        continue
      root = os.path.join(tmp, str(k))
      fabricate(root, len(indices), size=(h, w), seed=k)
      made = sorted(os.listdir(os.path.join(root, "images", "training")))
      for i, name in zip(indices, made):
        dst = os.path.join(path, f"{i:02d}_{w}x{h}.jpg")
        shutil.move(os.path.join(root, "images", "training", name), dst)
        files.append(dst)
  return sorted(files)


def build_bundle(path: str) -> float:
  """Writes the ViT-B/16 ADE20K bundle (random init, the config's test protocol recorded in
  `eval`) to `path`; returns the seconds the initialisation took."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from configs import segvit_vit_b16_ade20k  # pylint: disable=g-import-not-at-top
  from segvit_jax.bundle import probe_input, save_bundle  # pylint: disable=g-import-not-at-top
  from segvit_jax.data import ade20k  # pylint: disable=g-import-not-at-top
  from segvit_jax.models import build_model  # pylint: disable=g-import-not-at-top
  c = segvit_vit_b16_ade20k.get_config()
  model = build_model(c.model)
  t0 = time.perf_counter()
  params = jax.jit(lambda: nn.meta.unbox(
      model.init(jax.random.key(0), probe_input(c.model))["params"]))()
  params = jax.block_until_ready(params)
  init_s = time.perf_counter() - t0
  save_bundle(path, params, c.model, mean=c.mean, std=c.std,
              class_names=ade20k.class_names(reduce_zero=True), eval=c.eval.to_dict())
  return init_s


def windows_per_image(sizes: list[tuple[int, int]]) -> list[int]:
  """Model windows of each (width, height) image under the config's test protocol."""
  from configs import segvit_vit_b16_ade20k  # pylint: disable=g-import-not-at-top
  from segvit_jax.data import transforms  # pylint: disable=g-import-not-at-top
  from segvit_jax.evaluation import inference  # pylint: disable=g-import-not-at-top
  from segvit_jax.models import input_divisor  # pylint: disable=g-import-not-at-top
  c = segvit_vit_b16_ade20k.get_config()
  ev, counts = c.eval, []
  for w, h in sizes:
    th, tw = transforms.test_size(h, w, ev.resize, ev.scale, 1.0, ev.size_divisor, ev.min_size)
    _, starts = inference.window_layout(th, tw, ev.mode, ev.crop_size, ev.stride,
                                        input_divisor(c.model))
    counts.append(len(starts))
  return counts


def checkout_of(script: str) -> str:
  """'abc1234 (/path)': the git commit of the checkout holding `script`, '+' if it has local
  changes."""
  where = os.path.dirname(os.path.abspath(script))
  git = lambda *a: subprocess.run(["git", "-C", where, *a], capture_output=True,  # noqa: E731
                                  text=True, check=False).stdout.strip()
  commit = git("rev-parse", "--short", "HEAD") or "?"
  dirty = "+" if git("status", "--porcelain", "--untracked-files=no") else ""
  return f"{commit}{dirty} ({where})"


def child_env(script: str) -> dict[str, str]:
  """The environment of a predict.py run: its own checkout first on the import path, jax's
  compilation log on, no persistent cache from the environment."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.path.dirname(os.path.abspath(script))
  env["JAX_LOG_COMPILES"] = "1"
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  return env


def protocols_of(python: str, script: str) -> list[str | None]:
  """The --protocol values `script` accepts (from its --help), [None] where it has no such
  flag (run plainly)."""
  out = subprocess.run([python, script, "--help"], capture_output=True, text=True,
                       env=child_env(script), check=False)
  m = PROTOCOL_HELP.search(out.stdout + out.stderr)
  return m.group(1).split("|") if m else [None]


def run_predict(python: str, script: str, protocol: str | None, bundle: str, folder: str,
                output: str, log: str) -> dict:
  """Runs one predict.py to its exit: wall seconds, the arrival time of each image line, the
  programs XLA compiled (name, seconds), the seconds spent building programs (tracing +
  lowering + compiling) and the exit status."""
  cmd = [python, script, f"--checkpoint={bundle}", f"--input={folder}", f"--output={output}",
         "--compilation_cache="]
  if protocol is not None:
    cmd.append(f"--protocol={protocol}")
  with open(log, "w", encoding="utf-8") as err:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                            env=child_env(script), cwd=os.path.dirname(os.path.abspath(script)))
    stamps = []
    for line in proc.stdout:
      if IMAGE_LINE.match(line):
        stamps.append(time.perf_counter() - t0)
    rc = proc.wait()
    wall = time.perf_counter() - t0
  with open(log, encoding="utf-8") as f:
    text = f.read()
  compiles = [(m.group(1), float(m.group(2))) for m in COMPILE_LINE.finditer(text)]
  build = sum(float(m.group(1)) for m in BUILD_LINE.finditer(text))
  return {"cmd": cmd, "rc": rc, "wall": wall, "stamps": stamps, "compiles": compiles,
          "build": build}


def costliest_program(compiles: list[tuple[str, float]]) -> tuple[str, int]:
  """(name, times compiled) of the program whose XLA compilations took longest in total: the
  model's (the old Bundle.predict's `jit(<lambda>)`, the engine's `jit(model)`)."""
  total: dict[str, float] = {}
  for name, seconds in compiles:
    total[name] = total.get(name, 0.0) + seconds
  if not total:
    return "-", 0
  name = max(total, key=total.get)
  return name, sum(n == name for n, _ in compiles)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=12, help="images in the folder")
  parser.add_argument("--predict", default=os.path.join(ROOT, "predict.py"),
                      help="comma-separated predict.py paths (the first is the reference)")
  parser.add_argument("--workdir", default=None,
                      help="where the folder and the bundle are built (reused if there); "
                      "default: a temporary directory")
  parser.add_argument("--python", default=sys.executable, help="the interpreter to run them")
  args = parser.parse_args()
  scripts = [p for p in args.predict.split(",") if p]
  for s in scripts:
    if not os.path.isfile(s):
      parser.error(f"--predict: {s} does not exist")
  tmp = None
  if args.workdir is None:
    tmp = tempfile.TemporaryDirectory()
    args.workdir = tmp.name
  folder = os.path.join(args.workdir, f"images_{args.images}")
  bundle = os.path.join(args.workdir, "bundle_vit_b16_ade20k")
  if not os.path.isdir(folder):
    build_folder(folder, args.images)
  if not os.path.isfile(os.path.join(bundle, "config.json")):
    print(f"random init of the bundle: {build_bundle(bundle):.0f} s", flush=True)
  sizes = folder_sizes(args.images)
  windows = windows_per_image(sizes)
  print(f"{args.images} JPEGs, {len(set(sizes))} sizes (W x H: "
        f"{', '.join(f'{w}x{h}' for w, h in sorted(set(sizes)))}); the protocol's 512 px "
        f"windows: {sum(windows)} ({' + '.join(map(str, windows))}); {os.cpu_count()} CPUs, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)

  rows = []
  for script in scripts:
    name = checkout_of(script)
    for protocol in protocols_of(args.python, script):
      label = protocol or "(no flag)"
      out = os.path.join(args.workdir, f"out_{len(rows)}")
      shutil.rmtree(out, ignore_errors=True)
      r = run_predict(args.python, script, protocol, bundle, folder, out,
                      os.path.join(args.workdir, f"stderr_{len(rows)}.log"))
      rows.append((name, label, r))
      first = r["stamps"][0] if r["stamps"] else float("nan")
      print(f"{name} {label}: exit {r['rc']}, {r['wall']:.1f} s, {len(r['stamps'])} images, "
            f"first image at {first:.1f} s, {len(r['compiles'])} compilations "
            f"({r['build']:.1f} s tracing + lowering + compiling), the costliest "
            f"{'%s x %d' % costliest_program(r['compiles'])}; image lines at "
            f"{[round(t, 1) for t in r['stamps']]}", flush=True)
      if r["rc"] != 0:
        print(f"  stderr: {os.path.join(args.workdir, f'stderr_{len(rows) - 1}.log')}")

  ref = len(rows[0][2]["stamps"]) / rows[0][2]["wall"] or float("nan")  # (none predicted)
  print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
  print("| checkout | protocol | images | wall s | images/s | ratio | to first image s | "
        "rest s / image | compilations (build s) |")
  print("|---|---|---|---|---|---|---|---|---|")
  for name, label, r in rows:
    n, st = len(r["stamps"]), r["stamps"]
    rate = n / r["wall"]
    rest = (st[-1] - st[0]) / (n - 1) if n > 1 else float("nan")
    first = st[0] if st else float("nan")
    print(f"| {name.split(' ')[0]} | {label} | {n} | {r['wall']:.1f} | {rate:.3f} | "
          f"{rate / ref:.2f}x | {first:.1f} | {rest:.2f} | {len(r['compiles'])} "
          f"({r['build']:.0f}) |")
  if tmp is not None:
    tmp.cleanup()


if __name__ == "__main__":
  main()
