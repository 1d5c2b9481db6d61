"""Curves of any `metrics.jsonl` keys of one or several training runs, overlaid, to a PNG
(mmsegmentation's `tools/analyze_logs.py plot_curve`).

  python -m segvit_jax.tools.plot --workdir runs/demo --keys loss,lr --output curves.png
  python -m segvit_jax.tools.plot --workdir runs/a,runs/b --keys loss,mIoU

One panel per key (x: the training step), one line per run, named by its workdir. Needs
matplotlib: `pip install -e '.[tools]'`.
"""

from __future__ import annotations

import collections
import json
import math
import os
import sys
from typing import Any, Mapping, Sequence

from absl import app, flags

from segvit_jax import runtime

METRICS_FILE = "metrics.jsonl"
INSTALL_HINT = "matplotlib is not installed: pip install -e '.[tools]'"


def define_flags() -> None:
  """The command line's flags (`runtime.run` defines them: importing this module defines none)."""
  flags.DEFINE_multi_string("workdir", None, "Training workdir (its metrics.jsonl) or the "
                            "metrics file itself; repeat it or give a comma list to overlay "
                            "several runs")
  flags.DEFINE_list("keys", ["loss"], "metrics.jsonl keys to plot, one panel each.")
  flags.DEFINE_string("output", "curves.png", "PNG file to write.")
  flags.mark_flag_as_required("workdir")


def metrics_path(workdir: str) -> str:
  """`workdir`/metrics.jsonl, or `workdir` itself when it is a file."""
  return workdir if os.path.isfile(workdir) else os.path.join(workdir, METRICS_FILE)


def read_metrics(path: str) -> list[dict[str, Any]]:
  """The records (one JSON object a line) of a metrics.jsonl; a missing file is an error
  naming it, a corrupt line one naming the file and the line."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found (expected a training workdir or its "
                            f"{METRICS_FILE})")
  records = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{number} is not a JSON record: {e}") from None
  return records


def numeric_keys(records: Sequence[Mapping[str, Any]]) -> list[str]:
  """The keys with a number in any record (not "step"), sorted."""
  return sorted({k for r in records for k, v in r.items()
                 if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)})


def curve(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of the records holding `key` as a number, in file order."""
  steps, values = [], []
  for r in records:
    v = r.get(key)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and "step" in r:
      steps.append(int(r["step"]))
      values.append(float(v))
  return steps, values


def check_keys(path: str, records: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> None:
  """One error naming the file and the keys it has when it is empty or lacks any of `keys`."""
  have = numeric_keys(records)
  if not have:
    raise ValueError(f"{path} holds no metrics records")
  missing = [k for k in keys if k not in have]
  if missing:
    raise ValueError(f"{path} has no key {', '.join(map(repr, missing))}; keys there: "
                     f"{', '.join(have)}")


def run_names(workdirs: Sequence[str]) -> list[str]:
  """Legend names: each run's directory name (the directory's for a metrics file given
  itself); the path as given where two names would be alike, and " (2)", " (3)", ... after a
  run given more than once."""
  paths = [os.path.normpath(os.path.abspath(w)) for w in workdirs]
  names = [os.path.basename(os.path.dirname(p) if os.path.isfile(p) else p) for p in paths]
  runs_named = collections.defaultdict(set)  # name -> the runs (paths) of that name
  for name, path in zip(names, paths):
    runs_named[name].add(path)
  names = [n if len(runs_named[n]) == 1 else w for n, w in zip(names, workdirs)]
  out = []
  for name in names:
    repeat = sum(o == name or o.startswith(f"{name} (") for o in out)
    out.append(f"{name} ({repeat + 1})" if repeat else name)
  return out


def split_workdirs(values: Sequence[str]) -> list[str]:
  """--workdir values, repeated and/or comma-separated, in order."""
  return [w for value in values for w in value.split(",") if w]


def plot_curves(runs: Mapping[str, Sequence[Mapping[str, Any]]], keys: Sequence[str],
                output: str):
  """Draws one panel per key (a line per run: {name: records}) and writes `output` (PNG).
  Returns the matplotlib Figure (closed: its axes can still be read)."""
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
  except ModuleNotFoundError:
    raise app.UsageError(INSTALL_HINT) from None
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  from matplotlib.ticker import MaxNLocator  # pylint: disable=import-outside-toplevel

  cols = min(len(keys), 2)
  rows = math.ceil(len(keys) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 4.0 * rows), squeeze=False)
  for ax, key in zip(axes.flat, keys):
    for name, records in runs.items():
      steps, values = curve(records, key)
      ax.plot(steps, values, label=name, marker="o" if len(steps) < 20 else None)
    ax.set_title(key)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(key)
    ax.grid(True, alpha=0.3)
    ax.legend()
  for ax in list(axes.flat)[len(keys):]:
    ax.set_visible(False)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  fig.savefig(output, dpi=100)
  plt.close(fig)
  return fig


def plot_workdirs(workdirs: Sequence[str], keys: Sequence[str], output: str):
  """Reads each run's metrics, checks `keys` in all of them before drawing, plots (see
  `plot_curves`)."""
  if not keys:
    raise app.UsageError("--keys is empty: name at least one metrics.jsonl key")
  runs = {}
  for name, workdir in zip(run_names(workdirs), workdirs):
    path = metrics_path(workdir)
    records = read_metrics(path)
    check_keys(path, records, keys)
    runs[name] = records
  return plot_curves(runs, keys, output)


def main(argv: list[str]) -> None:
  runtime.no_arguments(argv)
  workdirs = split_workdirs(flags.FLAGS.workdir)
  plot_workdirs(workdirs, flags.FLAGS.keys, flags.FLAGS.output)
  print(f"wrote {flags.FLAGS.output} ({', '.join(flags.FLAGS.keys)} of {len(workdirs)} "
        f"run{'s' if len(workdirs) > 1 else ''})")


if __name__ == "__main__":
  sys.exit(runtime.run(main, define_flags=define_flags))
