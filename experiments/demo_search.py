"""A search for the CPU demo profile: short Fashion-MNIST recipes, each trained and evaluated as `make demo` does,
and recorded next to the same network's random-init accuracy.

    python -m experiments.demo_search --candidates cpu --seeds 0 1 [--table docs/demo_recipes.md]

Every run appends one row to the table (flags, minutes, img/s, init / trained 20-NN top-1, collapse diagnostics), so
the record of what was tried grows with each search instead of being rewritten; the recipes tried so far, and what
each scored, live in that table, not here. A recipe counts as learning when the trained teacher beats its own random
init by at least demo.LEARNED_MARGIN points, for 2 seeds, within 10 minutes of train + eval on 2 CPU cores.

To try a recipe, add an entry to CANDIDATES: name -> (changes to BASE's fields, e.g. {"epochs": 4, "local_crops":
2}; main_dino.py flags on top of configs/fmnist_vit_tiny_sparo.yaml, which replace the profile's own flags), and
run it for two seeds. When it wins, make it demo.PROFILES["cpu"] and the "cpu" entry follows.
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from experiments import demo
from sparo_dino.cli import errors as cli_errors
from sparo_dino.io import provenance

# The fields a candidate changes start from these, written out rather than read from the demo's profile, so that a
# recorded candidate keeps its meaning when the demo's profile changes.
BASE = demo.Profile("search", num_train=4096, num_test=2000, epochs=3, warmup_epochs=1, batch_size=32, local_crops=2)
CPU = demo.PROFILES["cpu"]
CANDIDATES: dict[str, tuple[dict, tuple[str, ...]]] = {
    # what `make demo` runs on CPU, to measure it again on another machine or for more seeds
    "cpu": ({"epochs": CPU.epochs, "local_crops": CPU.local_crops, "batch_size": CPU.batch_size}, CPU.flags),
}

HEADER = ("| candidate | seed | profile changes | flags | train min | total min | img/s | init top-1 | trained top-1 "
          "| gain | teacher entropy | KL | loss | machine |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")


def record(table: Path, name: str, seed: int, changes: dict, flags: tuple[str, ...], summary: dict,
           images_per_s: float) -> None:
    table.parent.mkdir(parents=True, exist_ok=True)
    if not table.exists() or HEADER not in table.read_text():
        with table.open("a") as handle:
            handle.write(HEADER)
    row = (f"| {name} | {seed} | {changes or '-'} | `{' '.join(flags) or '-'}` | {summary['train_seconds'] / 60:.1f} | "
           f"{summary['total_seconds'] / 60:.1f} | {images_per_s:.1f} | {summary['init_top1']:.2f} | "
           f"{summary['trained_top1']:.2f} | {summary['trained_top1'] - summary['init_top1']:+.2f} | "
           f"{summary['teacher_entropy']:.3f} | {summary['kl']:.3f} | {summary['loss']:.3f} | "
           f"{provenance.machine()} |\n")
    with table.open("a") as handle:
        handle.write(row)
    print(row, end="", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = cli_errors.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", nargs="+", choices=tuple(CANDIDATES), default=list(CANDIDATES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--table", type=Path, default=demo.REPO_ROOT / "docs" / "demo_recipes.md")
    parser.add_argument("--num_workers", type=int, default=1)
    args = parser.parse_args(argv)
    for name in args.candidates:
        changes, flags = CANDIDATES[name]
        for seed in args.seeds:
            profile = dataclasses.replace(BASE, name=name, **changes,
                                          flags=(*flags, "--seed", str(seed)))
            with tempfile.TemporaryDirectory() as folder:
                summary = demo.run(Path(folder), profile, args.num_workers)
                steps = profile.epochs * (profile.num_train // profile.batch_size)
            images_per_s = steps * profile.batch_size / summary["train_seconds"]
            record(args.table, name, seed, changes, flags, summary, images_per_s)


if __name__ == "__main__":
    main()
