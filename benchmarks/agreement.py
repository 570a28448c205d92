"""Do the two augmentation pipelines train the same thing? Short runs of main_dino.py with --augmentation per_image
and batched over several seeds: the loss curve per logged step and the teacher's k-NN at the end (with the untrained
network's, the run's own random-init baseline), per pipeline as mean and spread over the seeds.

The pipelines agree when, at every logged step and for the final k-NN, the difference of their means stays within
3 standard errors of that difference (from the seeds' spread). tests/test_fast_path.py runs this at a tiny size;
docs/performance.md reports a Fashion-MNIST run:
    python benchmarks/agreement.py --seeds 3 -- --config configs/fmnist_vit_tiny.yaml --data_path SUBSET_DIR \
        --epochs 2 --warmup_epochs 1 --local_crops_number 2 --knn_every 2 --num_workers 2
Everything after `--` is main_dino.py's flags (data, model, schedule, the k-NN monitor, which must be on); this
script adds --seed, --augmentation, --output_dir and --print_freq.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from typing import Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import Row  # noqa: E402

import main_dino  # noqa: E402
from sparo_dino.train.progress import LOG_NAME  # noqa: E402

PIPELINES = ("per_image", "batched")
_LOSS = re.compile(r"\| loss ([0-9.]+) \|")


@dataclass
class PipelineRuns:
    """One pipeline over the seeds: losses (seeds, logged steps), final k-NN top-1 and init k-NN per seed."""
    losses: torch.Tensor
    knn: torch.Tensor
    knn_init: torch.Tensor


def train_runs(train_argv: Sequence[str], seeds: Sequence[int], workdir: str, print_freq: int = 1
               ) -> dict[str, PipelineRuns]:
    """Train every (pipeline, seed) in this process; `train_argv` must enable the k-NN monitor (--knn_every)."""
    runs = {}
    for pipeline in PIPELINES:
        losses, knn, knn_init = [], [], []
        for seed in seeds:
            output_dir = os.path.join(workdir, f"{pipeline}_seed{seed}")
            console = io.StringIO()
            with contextlib.redirect_stdout(console):
                code = main_dino.main([*train_argv, "--seed", str(seed), "--augmentation", pipeline,
                                       "--output_dir", output_dir, "--print_freq", str(print_freq)])
            if code != 0:
                raise RuntimeError(f"{pipeline} seed {seed} exited with {code}:\n{console.getvalue()[-2000:]}")
            losses.append([float(value) for value in _LOSS.findall(console.getvalue())])
            with open(os.path.join(output_dir, LOG_NAME)) as handle:
                records = [json.loads(line) for line in handle]
            knn.append(records[-1]["knn_top1"])
            knn_init.append(records[0]["knn_top1_init"])
        runs[pipeline] = PipelineRuns(torch.tensor(losses), torch.tensor(knn), torch.tensor(knn_init))
    return runs


def standard_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Standard error of the difference of the means of a and b over their first dimension (the seeds)."""
    return torch.sqrt(a.var(0) / a.shape[0] + b.var(0) / b.shape[0])


def agree(runs: dict[str, PipelineRuns], knn_resolution: float = 0.0) -> bool:
    """Whether every logged step's mean loss and the mean final k-NN differ by at most 3 standard errors (the k-NN
    at least by `knn_resolution`, one test image's worth of accuracy, when all seeds score alike)."""
    per_image, batched = runs["per_image"], runs["batched"]
    difference = (batched.losses.mean(0) - per_image.losses.mean(0)).abs()
    loss_ok = bool((difference <= 3 * standard_error(per_image.losses, batched.losses)).all())
    knn_bound = max(3 * float(standard_error(per_image.knn, batched.knn)), knn_resolution)
    return loss_ok and abs(float(batched.knn.mean() - per_image.knn.mean())) <= knn_bound


def summary(runs: dict[str, PipelineRuns]) -> list[Row]:
    """Mean and spread (std over seeds) per pipeline, and the difference with its standard error."""
    per_image, batched = runs["per_image"], runs["batched"]
    seeds = per_image.losses.shape[0]
    rows = []
    for name, run in runs.items():
        curve = ", ".join(f"{m:.3f}±{s:.3f}" for m, s in zip(run.losses.mean(0).tolist(), run.losses.std(0).tolist()))
        rows += [Row("agreement", f"{name} pipeline, {seeds} seeds", "loss per logged step (mean±std)", curve),
                 Row("agreement", f"{name} pipeline, {seeds} seeds", "k-NN top-1 (mean±std; random init)",
                     f"{run.knn.mean():.2f}±{run.knn.std():.2f}; {run.knn_init.mean():.2f}±{run.knn_init.std():.2f}")]
    difference = batched.losses.mean(0) - per_image.losses.mean(0)
    error = standard_error(per_image.losses, batched.losses)
    rows += [Row("agreement", "batched - per_image", "loss difference per step (standard error)",
                 ", ".join(f"{d:+.3f} ({e:.3f})" for d, e in zip(difference.tolist(), error.tolist()))),
             Row("agreement", "batched - per_image", "k-NN difference (standard error)",
                 f"{batched.knn.mean() - per_image.knn.mean():+.2f} "
                 f"({standard_error(per_image.knn, batched.knn):.2f})"),
             Row("agreement", "batched - per_image", "within 3 standard errors", "yes" if agree(runs) else "NO")]
    return rows


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--print_freq", type=int, default=4, help="logged steps make the loss curve")
    parser.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("train_argv", nargs=argparse.REMAINDER, help="-- then main_dino.py's flags")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    train_argv = [flag for flag in args.train_argv if flag != "--"]
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="sparo_agreement_"))
        runs = train_runs(train_argv, range(args.seeds), workdir, args.print_freq)
    for row in summary(runs):
        print(f"{row.setting} | {row.metric}: {row.value}", flush=True)
    return 0 if agree(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
