"""The Fashion-MNIST GPU profile (`python -m experiments.demo --profile gpu`) shortened to --epochs: the demo end to
end on a GPU (train, then 20-NN of the teacher next to the same network at random init and raw pixels).

`make bench` runs it on a GPU; it does not fit in `make gpu-check`'s two device calls. Rows: the three top-1s, the
training and total seconds, whether the step ran compiled (from the run's provenance.jsonl; FAIL where --compile auto
asked for it on CUDA and nothing compiled), and which k-NN backend searched (torch where faiss is not installed, as on
the device image). The IDX files: --data_path, else $FASHION_MNIST_DIR, Debian's package or .gpu_data/ (`make
gpu-check-files`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import Row, fashion_mnist_dir  # noqa: E402

from experiments import demo  # noqa: E402
from sparo_dino.eval import knn  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--profile", default="gpu", choices=tuple(demo.PROFILES))
    parser.add_argument("--epochs", type=int, default=1, help="the profile shortened to this many epochs")
    parser.add_argument("--data_path", default=None, help="folder of the Fashion-MNIST IDX files")
    return parser


def measure(args: argparse.Namespace) -> list[Row]:
    data_path = args.data_path or fashion_mnist_dir(REPO)
    if data_path is None:
        raise SystemExit("error: no Fashion-MNIST IDX files: pass --data_path, or run `make gpu-check-files`")
    with tempfile.TemporaryDirectory(prefix="sparo_bench_fmnist_") as output_dir:
        summary = demo.main(["--profile", args.profile, "--epochs", str(args.epochs), "--data_path", data_path,
                             "--output_dir", output_dir])
        with open(Path(output_dir) / "train" / "provenance.jsonl") as handle:
            compiled = json.loads(handle.read().strip().splitlines()[-1])["compiled"]
    setting = f"vit_tiny_sparo, --profile {args.profile} shortened to {args.epochs} epoch(s)"
    asked = torch.cuda.is_available()  # --compile auto: compiled on CUDA
    search = "faiss" if knn.faiss is not None else "torch (faiss is not installed: the fallback)"
    return [Row("fmnist", setting, "20-NN top-1 trained / random init / raw pixels",
                f"{summary['trained_top1']:.2f} / {summary['init_top1']:.2f} / {summary['raw_pixel_top1']:.2f}"),
            Row("fmnist", setting, "seconds training / in all",
                f"{summary['train_seconds']:.0f} / {summary['total_seconds']:.0f}"),
            Row("fmnist", setting, "step ran compiled",
                f"{compiled}: not compiled FAIL" if asked and compiled is not True else str(compiled)),
            Row("fmnist", setting, "k-NN search", search)]


def main(argv: Sequence[str] | None = None) -> int:
    rows = measure(get_parser().parse_args(argv))
    return 1 if any(row.value.endswith("FAIL") for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
