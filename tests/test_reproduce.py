"""The read-out comparison (experiments.reproduce): its tables and Welch verdicts against numbers worked out by hand,
the lr sweep's choice, the 5-seed rule, the L that matches SPARO's size to the block it replaces, skipping finished
runs on a rerun, rebuilding the tables from the run record, and a tiny run end to end against the evaluation
scripts."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

import eval_knn
import eval_linear
import sparo_vit
from experiments import demo, reproduce
from experiments.reproduce import Stat, Variant
from sparo_dino.data import datasets

needs_readouts = pytest.mark.skipif(not hasattr(sparo_vit, "READOUTS"), reason="needs the read-out archs")
needs_fashion_mnist = pytest.mark.skipif(not os.path.isdir(datasets.FASHION_MNIST_DIR),
                                         reason="Debian's dataset-fashion-mnist is not installed (make data)")

C, D, V = 192, 64, 64  # vit_tiny width; SPARO's attention and slot sizes
# A timm ViT block of width C with MLP ratio 4: 2 LayerNorms (2C each), qkv (3C^2 + 3C), attention proj (C^2 + C),
# fc1 (4C^2 + 4C), fc2 (4C^2 + C).
BLOCK = 2 * 2 * C + (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C)


def sparo_count(num_slots: int, group_size: int = 1) -> int:
    """Queries L*D, keys C*(L/g)*D + (L/g)*D, the shared projection D*V + V."""
    groups = num_slots // group_size
    return num_slots * D + C * groups * D + groups * D + D * V + V


def test_mean_sample_std_and_standard_error_by_hand() -> None:
    stat = reproduce.summarize([70.0, 72.0, 74.0])
    # deviations -2, 0, 2: sum of squares 8 over n - 1 = 2 -> std 2; SE = 2 / sqrt(3)
    assert stat == Stat(72.0, 2.0, pytest.approx(2 / math.sqrt(3)), 3)
    assert reproduce.summarize([71.5]) == Stat(71.5, None, None, 1)


def _record(variant: str, seed: int, knn: float, linear: float, lr: float = 0.001, **extra) -> dict:
    arch = extra.pop("arch", f"vit_tiny_{variant}")
    return {"variant": variant, "arch": arch, "seed": seed, "lr": lr, "profile": "cpu",
            "flags": ["--arch", arch, "--lr", f"{lr:g}", "--seed", str(seed)],
            "knn_top1": knn, "knn_init_top1": 60.0, "linear_top1": linear, "linear_init_top1": 70.0,
            "linear_holdout_top1": linear, "encoding_dim": 192, "total_params": 1000, "readout_params": 100,
            "head_params": 10, "images_per_s": 50.0, "train_seconds": 120.0, "eval_seconds": 30.0,
            "num_train": 64, "num_test": 32, "machine": "test machine", "date": "2026-01-01", **extra}


def test_table_cells_and_welch_verdicts_by_hand() -> None:
    records = [_record("cls", seed, knn, 80.0) for seed, knn in enumerate((70.0, 72.0, 74.0))]
    records += [_record("sparo", seed, knn, linear) for seed, knn, linear in zip(range(3), (74.0, 76.0, 78.0),
                                                                                 (80.0, 81.0, 82.0))]
    summaries = reproduce.summarize_runs(reproduce.row_records(records[::-1], {}))  # record order does not matter
    table = reproduce.results_table(summaries, {"knn_top1": 78.15, "linear_top1": 83.35})
    cls_row, sparo_row, pixel_row = table.splitlines()[2:]
    assert cls_row.startswith("| cls |") and sparo_row.startswith("| sparo |")
    cells = [cell.strip() for cell in sparo_row.split("|")[1:-1]]
    assert cells[3:8] == ["100", "10", "1,000", "0.001", "0, 1, 2"]
    assert cells[8:14] == ["76.00 ± 2.00 [1.15]", "60.00 ± 0.00 [0.00]", "16.00 ± 2.00 [1.15]",
                           "81.00 ± 1.00 [0.58]", "70.00 ± 0.00 [0.00]", "11.00 ± 1.00 [0.58]"]
    assert cells[14] == "not measured yet"  # no PCA numbers in these records
    assert pixel_row.startswith("| raw pixels | 28 px, flattened | 784 |") and "| 78.15 |" in pixel_row \
        and "| 83.35 |" in pixel_row
    tests = reproduce.comparisons(summaries)
    assert [(t.row, t.reference, t.metric) for t in tests] == [
        ("sparo", "cls", "knn_top1"), ("sparo", "cls", "linear_top1"), ("sparo", "cls", "knn_gain"),
        ("sparo", "cls", "linear_gain")]  # each pair once; the PCA metrics were not measured
    # 20-NN: +4 with equal spreads (std 2) at n = 3: t = 4 / sqrt(8/3) = 2.449 at df 4; P(|T_4| > t) by the
    # closed form of Student's t at 4 degrees of freedom
    t = 4 / math.sqrt(8 / 3)
    u = t / math.sqrt(4 + t * t)
    p_knn = 1 - (1.5 * u - 0.5 * u ** 3)
    assert tests[0].test.p == pytest.approx(p_knn, abs=1e-9) and tests[0].test.df == pytest.approx(4.0)
    # linear: +1 against a row without spread, df 2: P(|T_2| > t) = 1 - t / sqrt(2 + t^2) with t = 1 / sqrt(1/3)
    t = math.sqrt(3)
    assert tests[1].test.p == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-9)
    # Holm over the 4: each adjusted p is at least its own times the number of tests left
    assert tests[0].adjusted_p >= tests[0].test.p and max(t.adjusted_p for t in tests) <= 1.0
    text = reproduce.comparisons_table(tests, summaries)
    first = text.splitlines()[2]
    assert first.startswith("| sparo | cls | 20-NN | 3 / 3 | +4.00 [") and first.endswith(
        " | no difference (undecided: p in (0.01, 0.2), fewer than 5 seeds) |")


def test_rows_of_undecided_comparisons_get_more_seeds() -> None:
    """p in (0.01, 0.2) -> both rows up to 5 seeds; a clear difference (p < 0.01) or none (p > 0.2) adds nothing."""
    def summaries(sparo_knn: tuple[float, ...]) -> dict:
        records = [_record("cls", seed, knn, 80.0 + seed) for seed, knn in enumerate((70.0, 72.0, 74.0))]
        records += [_record("sparo", seed, knn, 80.0 + seed) for seed, knn in enumerate(sparo_knn)]
        return reproduce.summarize_runs(reproduce.row_records(records, {}))

    for sparo_knn, expected in [((74.0, 76.0, 78.0), ["cls", "sparo"]),  # p = 0.07
                                ((90.0, 91.0, 92.0), []),  # p < 0.01
                                ((70.5, 72.5, 74.5), [])]:  # p = 0.77
        rows = summaries(sparo_knn)
        assert reproduce.rows_needing_seeds(reproduce.comparisons(rows), rows, 5) == expected, sparo_knn
    rows = summaries((74.0, 76.0, 78.0))
    assert reproduce.rows_needing_seeds(reproduce.comparisons(rows), rows, 3) == []  # they have 3 already
    # an undecided comparison without sparo (gap against cls, p = 0.07) adds no seeds; its verdict says so
    records = [_record(name, seed, knn, 80.0 + seed) for name, values in (("cls", (70.0, 72.0, 74.0)),
                                                                          ("gap", (74.0, 76.0, 78.0)),
                                                                          ("sparo", (90.0, 91.0, 92.0)))
               for seed, knn in enumerate(values)]
    rows = reproduce.summarize_runs(reproduce.row_records(records, {}))
    tests = reproduce.comparisons(rows)
    assert reproduce.rows_needing_seeds(tests, rows, 5) == []
    gap = reproduce.comparisons_table(tests, rows).splitlines()[2]  # p = 0.07 as in the by-hand test above
    assert gap.startswith("| gap | cls | 20-NN | 3 / 3 | +4.00 [-0.53, +8.53] | 0.070 |")
    assert gap.endswith("| no difference (undecided: p in (0.01, 0.2), fewer than 5 seeds) |")


def test_the_swept_lr_is_chosen_on_the_train_hold_out() -> None:
    records = [_record("sparo", 0, knn, 0.0, lr=lr, linear_holdout_top1=holdout)
               for lr, knn, holdout in ((0.0005, 90.0, 70.0), (0.001, 70.0, 72.0), (0.002, 60.0, 71.0))]
    # the best 20-NN on the test images is lr 0.0005; the hold-out chooses 0.001
    assert reproduce.chosen_lr(records, "sparo", 0, 0.001) == 0.001
    tie = [{**records[0], "linear_holdout_top1": 72.0}, records[1], {**records[2], "linear_holdout_top1": 72.0}]
    assert reproduce.chosen_lr(tie, "sparo", 0, 0.001) == 0.001  # a tie goes to the profile's lr
    assert reproduce.chosen_lr(tie[::2], "sparo", 0, 0.001) == 0.0005  # equally far: the smaller
    assert reproduce.chosen_lr(records, "cls", 0, 0.001) is None
    assert reproduce.sweep_lrs(reproduce.PROFILES["cpu"], (0.5, 1, 2)) == [0.0005, 0.001, 0.002]
    assert reproduce.profile_lr(reproduce.PROFILES["gpu"]) == 0.0005  # the config's


def test_closest_num_slots_against_a_hand_count() -> None:
    """vit_tiny's block holds 444,864 parameters; SPARO with V = D = 64 holds 12,416 L + 4,160: L = 35 gives
    438,720 (6,144 short), L = 36 gives 451,136 (6,272 over), so 35."""
    assert BLOCK == 444_864 and sparo_count(35) == 438_720 and sparo_count(36) == 451_136
    assert reproduce.closest_num_slots(BLOCK, sparo_count) == 35
    # with groups of 4 only multiples of 4 are candidates: the closest by brute force
    expected = min(range(4, 400, 4), key=lambda num_slots: abs(sparo_count(num_slots, 4) - BLOCK))
    assert reproduce.closest_num_slots(BLOCK, lambda n: sparo_count(n, 4), step=4) == expected
    assert reproduce.closest_num_slots(10, sparo_count) == 1  # smaller than any SPARO


@needs_readouts
def test_matched_sparo_uses_the_real_read_out_sizes(capsys) -> None:
    assert reproduce.readout_parameters("vit_tiny") == BLOCK
    for num_slots, group_size in ((64, 1), (35, 1), (8, 2)):
        assert reproduce.readout_parameters("vit_tiny_sparo", num_slots=num_slots, slot_dim=V, attn_dim=D,
                                            group_size=group_size) == sparo_count(num_slots, group_size)
    variant = reproduce.matched_variant()
    assert variant.arch == "vit_tiny_sparo" and variant.flags[:2] == ("--num_slots", "35")
    assert "L = 35, read-out 438,720 parameters; the vit_tiny block it replaces 444,864" in capsys.readouterr().out


def test_an_arch_missing_from_the_checkout_is_refused_up_front(monkeypatch) -> None:
    monkeypatch.setitem(reproduce.VARIANTS, "gap", Variant("gap", "vit_nonexistent_gap"))
    with pytest.raises(ValueError, match="vit_nonexistent_gap not in this checkout's sparo_vit.ARCHS"):
        reproduce.resolve_variants(["gap"])


def _idx_folder(folder) -> str:
    """40 random 28 px images of 2 classes as the 4 Fashion-MNIST IDX files."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 28, 28), dtype=np.uint8)
    labels = (np.arange(40) % 2).astype(np.uint8)
    for split in ("train", "t10k"):
        datasets.write_idx_ubyte(str(folder / f"{split}-images-idx3-ubyte"), images)
        datasets.write_idx_ubyte(str(folder / f"{split}-labels-idx1-ubyte"), labels)
    return str(folder)


TINY = demo.Profile("tiny", num_train=32, num_test=16, epochs=1, warmup_epochs=0, batch_size=16, local_crops=0,
                   flags=("--lr", "0.001"))


def test_a_rerun_skips_finished_runs_and_records_each_run_once(monkeypatch, tmp_path) -> None:
    """The sweep's 3 lrs at the first seed, the hold-out's choice at the others, an undecided comparison's rows up
    to 5 seeds; a rerun trains only what is missing."""
    (tmp_path / "idx").mkdir()
    data = _idx_folder(tmp_path / "idx")
    calls = []
    # sparo's 20-NN by seed: p = 0.07 against cls at 3 seeds (undecided), so both rows get seeds 3 and 4
    knn = {"cls": (70.0, 72.0, 74.0, 71.0, 73.0), "sparo": (74.0, 76.0, 78.0, 75.0, 77.0)}

    def fake_run(variant, seed, lr, profile, data_path, output_dir, num_workers):
        calls.append((variant.name, lr, seed))
        holdout = {0.0005: 70.0, 0.001: 71.0, 0.002: 72.0 if variant.name == "sparo" else 69.0}[lr]
        return _record(variant.name, seed, knn[variant.name][seed], 80.0 + seed, lr=lr, arch=variant.arch,
                       flags=list(reproduce.run_flags(variant, seed, lr)), linear_holdout_top1=holdout)

    monkeypatch.setattr(reproduce, "run_one", fake_run)
    monkeypatch.setattr(reproduce, "raw_pixels", lambda output_dir, data_path, epochs: {"knn_top1": 78.0})
    profile = reproduce.Profile("cpu", TINY, linear_epochs=1, tokens="5")
    variants = [Variant("cls", "vit_tiny"), Variant("sparo", "vit_tiny_sparo")]
    runs, docs = tmp_path / "runs", tmp_path / "docs"
    reproduce.run_all(profile, variants, [0, 1, 2], runs, docs, data_path=data)
    assert calls == [("cls", 0.0005, 0), ("cls", 0.001, 0), ("cls", 0.002, 0),
                     ("sparo", 0.0005, 0), ("sparo", 0.001, 0), ("sparo", 0.002, 0),
                     ("cls", 0.001, 1), ("sparo", 0.002, 1), ("cls", 0.001, 2), ("sparo", 0.002, 2),
                     ("cls", 0.001, 3), ("cls", 0.001, 4), ("sparo", 0.002, 3), ("sparo", 0.002, 4)]
    assert json.loads((runs / "sparo_lr0.002_seed1.json").read_text())["flags"] == [
        "--arch", "vit_tiny_sparo", "--lr", "0.002", "--seed", "1"]
    (runs / "sparo_lr0.002_seed1.json").unlink()  # as if killed in that run (a half-written file stays a temporary)
    (runs / ".sparo_lr0.002_seed1.json.tmp.99999").write_text("{")
    calls.clear()
    records = reproduce.run_all(profile, variants, [0, 1, 2], runs, docs, data_path=data)
    assert calls == [("sparo", 0.002, 1)] and len(records) == 14
    page = (docs / "readouts.md").read_text()
    assert page.count("| 2026-01-01 | cpu | sparo | 1 |") == 2 and page.count("| 2026-01-01 | cpu | cls | 0 |") == 3
    assert page.count("| cls | vit_tiny (-)") == 1  # the table was replaced, not appended
    # rows at their chosen lr and all 5 seeds; the sweep's other runs stay in the record only
    assert "| sparo | vit_tiny_sparo (-) | 192 | 100 | 10 | 1,000 | 0.002 | 0, 1, 2, 3, 4 |" in page
    assert "lr swept on seed 0 and chosen per row on the probe's train hold-out (cls 0.001, sparo 0.002)" in page
    # the table holds every finished run in the folder, also when this invocation names fewer
    calls.clear()
    assert {r["variant"] for r in reproduce.run_all(profile, variants[:1], [0], runs, docs, data_path=data,
                                                    max_seeds=0)} == {"cls"}
    assert calls == [] and "| sparo | vit_tiny_sparo (-) | 192 | 100 | 10 | 1,000 | 0.002 | 0, 1, 2, 3, 4 |" in \
        (docs / "readouts.md").read_text()
    # the run record rebuilds the same tables (the --from_record path): same rows, same comparisons
    rebuilt = reproduce.records_from_page((docs / "readouts.md").read_text(), reproduce.PROFILES["cpu"])
    assert sorted((r["variant"], r["lr"], r["seed"]) for r in rebuilt) == sorted(
        (r["variant"], r["lr"], r["seed"]) for r in records)
    sparo = next(r for r in rebuilt if (r["variant"], r["lr"], r["seed"]) == ("sparo", 0.002, 4))
    assert (sparo["knn_top1"], sparo["knn_init_top1"], sparo["linear_holdout_top1"]) == (77.0, 60.0, 72.0)
    assert sparo["encoding_dim"] == 4096 and sparo["readout_params"] == sparo_count(64)  # sizes from the flags
    # a finished run trained with other flags than its variant has now is not mixed into the row
    with pytest.raises(ValueError, match="cls_lr0.0005_seed0.json was trained with --arch vit_tiny --lr 0.0005 "
                                         "--seed 0, cls is now --arch vit_tiny --num_slots 35 --lr 0.0005 --seed 0"):
        reproduce.run_all(profile, [Variant("cls", "vit_tiny", ("--num_slots", "35"))], [0], runs, docs,
                          data_path=data)


def test_sections_are_replaced_between_their_markers(tmp_path) -> None:
    doc = tmp_path / "readouts.md"
    reproduce.ensure_document(doc)
    reproduce.replace_section(doc, "cpu", "first")
    reproduce.replace_section(doc, "cpu", "second")
    page = doc.read_text()
    assert "second" in page and "first" not in page  # the other profiles still wait:
    assert page.count("not measured yet") == len(reproduce.PROFILES) - 1
    doc.write_text("no markers here")
    with pytest.raises(ValueError, match="must hold the markers <!-- readouts:cpu:begin -->"):
        reproduce.replace_section(doc, "cpu", "x")


@needs_readouts
@needs_fashion_mnist
def test_tiny_profile_end_to_end_writes_table_figure_and_records(tmp_path, monkeypatch) -> None:
    """2 read-outs x 1 seed on 64 images for 1 epoch: the record's numbers are what eval_knn.py and eval_linear.py
    give for the checkpoint (the one in-process extraction changes nothing), the sizes are the hand counts, and
    the tables, the raw pixels and the figure land in the docs folder given."""
    monkeypatch.setattr(reproduce, "PCA_DIM", 8)  # 64 train images cannot give 192 components
    profile = reproduce.Profile("cpu", demo.Profile("tiny", num_train=64, num_test=32, epochs=1, warmup_epochs=0,
                                                    batch_size=16, local_crops=0,
                                                    flags=("--patch_size", "16", "--out_dim", "256", "--lr", "0.01")),
                                linear_epochs=2, tokens="5")
    runs, docs = tmp_path / "runs", tmp_path / "docs"
    records = reproduce.run_all(profile, reproduce.resolve_variants(["cls", "sparo"]), [0], runs, docs,
                                num_workers=0, sweep=[1.0], max_seeds=0)
    by_name = {record["variant"]: record for record in records}
    assert by_name["cls"]["readout_params"] == BLOCK and by_name["sparo"]["readout_params"] == sparo_count(64)
    assert by_name["cls"]["encoding_dim"] == C and by_name["sparo"]["encoding_dim"] == 64 * 64
    # the DINO head: C_in x 2048 + 2048 x 2048 + 2048 x 256 (+ biases), then 256 x out_dim and its norm magnitudes
    head = [C * 2048 + 2048 + 2048 * 2048 + 2048 + 2048 * 256 + 256 + 256 * 256 + 256,
            64 * 64 * 2048 + 2048 + 2048 * 2048 + 2048 + 2048 * 256 + 256 + 256 * 256 + 256]
    assert [by_name["cls"]["head_params"], by_name["sparo"]["head_params"]] == head
    assert by_name["cls"]["feature_kind"] == "cls_last1" and by_name["sparo"]["feature_kind"] == "sparo_encoding"
    record = by_name["sparo"]
    checkpoint = runs / "sparo_lr0.01_seed0" / "train" / "checkpoint.pth"
    common = ["--pretrained_weights", str(checkpoint), "--data_path", str(runs / "data"), *demo.EVAL_FLAGS,
              "--num_workers", "0", "--init_baseline"]
    for prefix, width in (("", []), ("pca_", ["--pca_dim", "8"])):
        knn = eval_knn.main([*common, *width, "--nb_knn", "20", "--output_dir", str(tmp_path / f"knn{prefix}")])
        linear = eval_linear.main([*common, *width, "--fast", "--epochs", "2", "--seed", "0",
                                   "--output_dir", str(tmp_path / f"linear{prefix}")])
        assert (record[f"{prefix}knn_top1"], record[f"{prefix}knn_init_top1"]) == (
            knn["knn"]["20"]["top1"], knn["init_baseline"]["20"]["top1"])
        assert (record[f"{prefix}linear_top1"], record[f"{prefix}linear_init_top1"]) == (
            linear["final"]["top1"], linear["init_baseline"]["final"]["top1"])
        grid = linear["lr_grid"]
        assert record[f"{prefix}linear_holdout_top1"] == grid["holdout_top1"][grid["chosen"]]
    assert record["images_per_s"] > 0 and (record["num_train"], record["num_test"]) == (64, 32)
    assert json.loads((runs / "sparo_lr0.01_seed0.json").read_text()) == record
    pixels = json.loads((runs / "raw_pixels.json").read_text())
    assert pixels["knn_top1"] == pytest.approx(demo.raw_pixel_top1(str(runs / "data")))
    page = (docs / "readouts.md").read_text()
    assert "| cls | vit_tiny (-) | 192 | 444,864 |" in page and "| sparo | vit_tiny_sparo (num_slots=64" in page
    assert "n/a (1 seed)" in page and page.count("| 0 | `--arch vit_tiny") == 2  # two run-record rows
    assert f"| raw pixels | 28 px, flattened | 784 | - | - | - | - | - | {pixels['knn_top1']:.2f} |" in page
    assert (docs / "readouts_fmnist_cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_shipped_page_takes_the_tables_and_the_record() -> None:
    """docs/readouts.md holds each profile's markers once and the record's header, so a run fills it in place
    instead of appending a second record table."""
    page = (reproduce.DOCS_DIR / reproduce.DOC_NAME).read_text()
    for profile in reproduce.PROFILES:
        assert all(page.count(marker) == 1 for marker in reproduce.markers(profile))
    assert page.count(reproduce.RECORD_HEADER) == 1 and page.rstrip().endswith("|")


def test_the_lrs_of_a_sweep_share_one_evaluation_of_the_init(monkeypatch, tmp_path) -> None:
    """The network a run starts from depends on the read-out and the seed, not the lr: a second lr of the same
    (variant, seed) reads the first one's init scores; another seed or other read-out options evaluate again."""
    evaluated = []

    def fake_evaluate(features, seed, linear_epochs, output_dir):
        evaluated.append((features, seed))
        return {"knn_top1": 60.0 + len(evaluated)}

    monkeypatch.setattr(reproduce, "extract", lambda checkpoint, data_path, workers, at_init: f"init of {checkpoint}")
    monkeypatch.setattr(reproduce, "evaluate", fake_evaluate)
    profile = reproduce.Profile("cpu", TINY, linear_epochs=1, tokens="5")
    sparo = Variant("sparo", "vit_tiny_sparo", ("--num_slots", "64"))

    def scores(variant, seed, checkpoint):
        return reproduce.initial_scores(variant, seed, profile, tmp_path / checkpoint, "data", tmp_path, 0)

    assert scores(sparo, 0, "lr0.001") == {"knn_top1": 61.0}
    assert scores(sparo, 0, "lr0.002") == {"knn_top1": 61.0}  # read back, not evaluated
    assert scores(sparo, 1, "lr0.001") == {"knn_top1": 62.0}
    assert scores(Variant("sparo", "vit_tiny_sparo", ("--num_slots", "3")), 0, "lr0.001") == {"knn_top1": 63.0}
    assert [seed for _, seed in evaluated] == [0, 1, 0]
    assert evaluated[0][0] == f"init of {tmp_path / 'lr0.001'}"
    assert not list(tmp_path.glob("*_seed*.json"))  # where the finished runs are: a cache file is not one of them


def _append_rows(doc: str, worker: int, count: int) -> None:
    for seed in range(count):
        reproduce.append_record(Path(doc), _record("sparo", seed, 70.0, 80.0, date=f"worker-{worker}"))


def test_two_drivers_sharing_the_page_keep_every_run_record_row(tmp_path) -> None:
    """Two drivers on disjoint --variants append to one docs/readouts.md at once (docs/readouts.md, "Two
    processes"): the page lock keeps every row of both."""
    import multiprocessing

    doc = tmp_path / "readouts.md"
    reproduce.ensure_document(doc)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_append_rows, args=(str(doc), worker, 60)) for worker in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    page = doc.read_text()
    assert [page.count(f"| worker-{worker} | cpu | sparo |") for worker in range(2)] == [60, 60]
    assert page.count(reproduce.RECORD_HEADER) == 1


def _append_when_ready(doc: str, ready) -> None:
    ready.set()  # imports done: what follows is the append alone
    _append_rows(doc, 1, 1)


def test_the_page_lock_holds_while_its_holder_reads_and_writes_the_page(tmp_path) -> None:
    """A POSIX record lock would be dropped the moment the holder's read_text closes its own descriptor of the page;
    the lock holds until the holder leaves the block, so another driver's row waits for it."""
    import multiprocessing

    doc = tmp_path / "readouts.md"
    reproduce.ensure_document(doc)
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    other = context.Process(target=_append_when_ready, args=(str(doc), ready))
    with reproduce.locked(doc):
        doc.write_text(doc.read_text())  # the holder opens and closes the page, as replace_section does
        other.start()
        assert ready.wait(120)
        other.join(3)
        assert other.is_alive() and "| worker-1 |" not in doc.read_text()  # still waiting for the lock
    other.join(60)
    assert other.exitcode == 0 and doc.read_text().count("| worker-1 | cpu | sparo |") == 1
