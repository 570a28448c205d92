"""Training curves of one or more runs in one PNG, to compare DINO and DINO+SPARO side by side.

    python plot_logs.py out/dino out/dino_sparo --output curves.png [--keys train_loss knn_top1]

Reads each run's log.txt (one JSON object per epoch, written by main_dino.py) and draws one panel per metric,
one line per run. Without --keys it draws every numeric metric that any of the runs logged. The k-NN monitor's
random-init value (knn_top1_init) is the first point of the knn_top1 curve, at epoch -1.
"""
from __future__ import annotations

import json
import math
import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on clusters or in CI
import matplotlib.pyplot as plt  # noqa: E402

from sparo_dino.cli import errors as cli_errors  # noqa: E402
from sparo_dino.cli.errors import OutputDirError, require_writable_dirs  # noqa: E402
from sparo_dino.train.progress import LOG_NAME  # noqa: E402


def read_log(run_dir: str) -> list[dict[str, float]]:
    """The epoch records of a run; a line cut short by a kill mid-write is skipped, not fatal."""
    path = os.path.join(run_dir, LOG_NAME) if os.path.isdir(run_dir) else run_dir
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {LOG_NAME} in {run_dir}")
    records = []
    with open(path, encoding="utf-8", errors="replace") as handle:  # a binary file holds no records, not a crash
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    if not records:
        raise ValueError(f"{path} holds no epoch records (JSON lines of main_dino.py's {LOG_NAME})")
    return records


INIT_SUFFIX = "_init"  # knn_top1_init: the metric of the untrained network, drawn at epoch -1 of its metric


def numeric_keys(runs: dict[str, list[dict]]) -> list[str]:
    keys = {key for records in runs.values() for record in records for key, value in record.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch"}
    return sorted(key for key in keys if not (key.endswith(INIT_SUFFIX) and key.removesuffix(INIT_SUFFIX) in keys))


def curve(records: list[dict], key: str) -> list[tuple[float, float]]:
    """(epoch, value) points of a metric; a value measured before training (`<key>_init`) comes first, at epoch
    -1, so the curve shows what training added to the random init."""
    points = [(-1, r[key + INIT_SUFFIX]) for r in records[:1] if isinstance(r.get(key + INIT_SUFFIX), (int, float))]
    return points + [(r.get("epoch", i), r[key]) for i, r in enumerate(records) if isinstance(r.get(key), (int, float))]


def plot_runs(runs: dict[str, list[dict]], keys: Sequence[str], path: str) -> str:
    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for name, records in runs.items():
            points = curve(records, key)
            if points:
                ax.plot(*zip(*points), marker="o", markersize=2, label=name)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def check_output(path: str) -> None:
    """Stop at once, with one line, when the PNG cannot be written where --output says: before reading any log."""
    if os.path.isdir(path):
        raise SystemExit(f"error: --output {path} is a folder; name the PNG file to write")
    try:
        require_writable_dirs({"--output folder": os.path.dirname(os.path.abspath(path))})
    except OutputDirError as error:
        raise SystemExit(f"error: {error}") from None


def main(argv: Sequence[str] | None = None) -> str:
    parser = cli_errors.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="output dirs (or log.txt files) of training runs")
    parser.add_argument("--keys", nargs="*", default=None, help="metrics to draw (default: every numeric one)")
    parser.add_argument("--output", type=str, default="training_curves.png")
    args = parser.parse_args(argv)
    check_output(args.output)
    try:
        runs = {os.path.basename(os.path.normpath(run)) or run: read_log(run) for run in args.runs}
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    available = numeric_keys(runs)
    keys = args.keys or available
    missing = [key for key in keys if key not in available]
    if missing:
        raise SystemExit(f"error: metric(s) {', '.join(missing)} not in any log; logged: {', '.join(available)}")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    path = plot_runs(runs, keys, args.output)
    print(f"{len(keys)} curves of {len(runs)} run(s) written to {path}")
    return path


if __name__ == "__main__":
    main()
