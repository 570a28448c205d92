"""The demo-profile search keeps its record: every candidate is a valid main_dino.py command line on the demo's
config, and every run appends one row (the header once) to the table."""
from __future__ import annotations

import dataclasses

import pytest

from experiments import demo, demo_search
from sparo_dino.cli.train_flags import parse_train_args


@pytest.mark.parametrize("name", list(demo_search.CANDIDATES))
def test_every_candidate_parses_as_main_dino_flags(name: str) -> None:
    changes, flags = demo_search.CANDIDATES[name]
    profile = dataclasses.replace(demo_search.BASE, **changes)
    args = parse_train_args(["--config", str(demo.CONFIGS["vit_tiny_sparo"]), "--epochs", str(profile.epochs),
                             "--warmup_epochs", str(profile.warmup_epochs), *flags])
    assert args.arch == "vit_tiny_sparo" and args.epochs == profile.epochs


def test_the_cpu_candidate_is_the_demos_profile() -> None:
    changes, flags = demo_search.CANDIDATES["cpu"]
    assert dataclasses.replace(demo_search.BASE, **changes, flags=flags, name="cpu") == demo.PROFILES["cpu"]


def test_each_run_appends_a_row_under_one_header(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(demo_search.CANDIDATES, "p8_b32", ({"epochs": 2, "batch_size": 32},
                                                           ("--patch_size", "8", *demo.SHORT_RUN_FLAGS)))
    summaries = iter([{"trained_top1": 60.0, "init_top1": 54.0, "raw_pixel_top1": 78.15, "train_seconds": 300.0,
                       "total_seconds": 420.0, "teacher_entropy": 5.5, "kl": 0.4, "loss": 6.0},
                      {"trained_top1": 53.0, "init_top1": 55.0, "raw_pixel_top1": 78.15, "train_seconds": 240.0,
                       "total_seconds": 360.0, "teacher_entropy": 6.9, "kl": 0.01, "loss": 6.9}])
    monkeypatch.setattr(demo, "run", lambda folder, profile, workers: next(summaries))
    table = tmp_path / "recipes.md"
    table.write_text("# search\n")
    demo_search.main(["--candidates", "p8_b32", "--seeds", "0", "1", "--table", str(table)])
    lines = table.read_text().splitlines()
    assert lines[0] == "# search" and lines.count(demo_search.HEADER.splitlines()[0]) == 1
    rows = [line for line in lines if line.startswith("| p8_b32 |")]
    assert len(rows) == 2
    # 2 epochs x 4096 / 32 steps of 32 images in 300 s; gain = trained - init
    assert "| 0 |" in rows[0] and "| 5.0 | 7.0 | 27.3 | 54.00 | 60.00 | +6.00 |" in rows[0]
    assert "| 1 |" in rows[1] and "| -2.00 |" in rows[1]
