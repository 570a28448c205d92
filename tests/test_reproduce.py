"""The read-out comparison (experiments.reproduce): its statistics and 2-SE verdicts against numbers worked out by
hand, the L that matches SPARO's size to the block it replaces, skipping finished runs on a rerun, and a tiny run
end to end that writes the table and the figure."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

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


def test_two_standard_error_rule() -> None:
    """SE of a difference of independent means: sqrt(SE_a^2 + SE_b^2); under 2 of them it is no difference."""
    reference = Stat(72.0, 2.0, 2 / math.sqrt(3), 3)
    se = math.sqrt(2) * 2 / math.sqrt(3)  # 1.633
    assert reproduce.compare(Stat(76.0, 2.0, 2 / math.sqrt(3), 3), reference) == (4.0, pytest.approx(se), "better")
    assert reproduce.compare(Stat(68.0, 2.0, 2 / math.sqrt(3), 3), reference)[2] == "worse"
    # 2.5 points is 1.5 SE of the difference: more than one SE, still no difference
    assert reproduce.compare(Stat(74.5, 2.0, 2 / math.sqrt(3), 3), reference) == (2.5, pytest.approx(se),
                                                                                  "no difference")
    assert reproduce.compare(Stat(72.0, 0.0, 0.0, 3), Stat(72.0, 0.0, 0.0, 3))[2] == "no difference"
    assert reproduce.compare(Stat(75.0, None, None, 1), reference) == (3.0, None, "n/a (1 seed)")


def _record(variant: str, seed: int, knn: float, linear: float, **extra) -> dict:
    return {"variant": variant, "arch": extra.get("arch", f"vit_tiny_{variant}"), "seed": seed, "profile": "cpu",
            "flags": ["--arch", extra.get("arch", f"vit_tiny_{variant}"), "--seed", str(seed)], "linear_flags": [],
            "knn_top1": knn, "knn_init_top1": 60.0, "linear_top1": linear, "linear_init_top1": 70.0,
            "feature_kind": "x", "encoding_dim": 192, "total_params": 1000, "readout_params": 100,
            "images_per_s": 50.0, "train_seconds": 120.0, "eval_seconds": 30.0,
            "num_train": 64, "num_test": 32, "machine": "test machine", "date": "2026-01-01"}


def test_table_cells_and_verdicts_by_hand() -> None:
    records = [_record("cls", seed, knn, 80.0) for seed, knn in enumerate((70.0, 72.0, 74.0))]
    records += [_record("sparo", seed, knn, linear) for seed, knn, linear in zip(range(3), (74.0, 76.0, 78.0),
                                                                                 (80.0, 81.0, 82.0))]
    table = reproduce.results_table(reproduce.summarize_runs(records[::-1]))  # order of the records does not matter
    cls_row, sparo_row = table.splitlines()[2:]
    assert cls_row.startswith("| cls |") and sparo_row.startswith("| sparo |")
    cells = [cell.strip() for cell in sparo_row.split("|")[1:-1]]
    assert cells[6:12] == ["76.00 ± 2.00 [1.15]", "60.00 ± 0.00 [0.00]", "16.00 ± 2.00 [1.15]",
                           "81.00 ± 1.00 [0.58]", "70.00 ± 0.00 [0.00]", "11.00 ± 1.00 [0.58]"]
    # 20-NN: +4 with SE sqrt(4/3 + 4/3) = 1.63 -> better; linear: +1 with SE sqrt(0 + 1/3) = 0.58, under 2 SE
    assert cells[15] == "20-NN +4.00 ± 1.63: better; linear +1.00 ± 0.58: no difference"
    assert cells[16] == "-"
    cls_cells = [cell.strip() for cell in cls_row.split("|")[1:-1]]
    assert cls_cells[6] == "72.00 ± 2.00 [1.15]" and cls_cells[15] == "-"
    assert cls_cells[16] == "20-NN -4.00 ± 1.63: worse; linear -1.00 ± 0.58: no difference"


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


@needs_readouts
def test_linear_probe_must_read_what_knn_reads(monkeypatch) -> None:
    """The official baseline probe reads the CLS of 4 blocks: without --n_last_blocks 1 the cls row would be probed
    on other features than its k-NN, and the script refuses before training."""
    assert [v.name for v in reproduce.resolve_variants(["cls", "sparo"])] == ["cls", "sparo"]
    monkeypatch.setattr(reproduce, "linear_flags", lambda variant: ())
    with pytest.raises(ValueError, match="linear probe would read 'cls_last4' features, k-NN reads 'cls_last1'"):
        reproduce.resolve_variants(["cls"])


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


def test_a_rerun_skips_finished_runs_and_records_each_run_once(monkeypatch, tmp_path) -> None:
    (tmp_path / "idx").mkdir()
    data = _idx_folder(tmp_path / "idx")
    calls = []

    def fake_run(variant, seed, profile, data_path, output_dir, num_workers):
        calls.append((variant.name, seed))
        return {**_record(variant.name, seed, 70.0 + seed, 80.0), "arch": variant.arch,
                "flags": list(reproduce.run_flags(variant, seed))}

    monkeypatch.setattr(reproduce, "run_one", fake_run)
    profile = reproduce.Profile("cpu", demo.Profile("tiny", num_train=32, num_test=16, epochs=1, warmup_epochs=0,
                                                    batch_size=16, local_crops=0), linear_epochs=1)
    variants = [Variant("cls", "vit_tiny"), Variant("sparo", "vit_tiny_sparo")]
    runs, docs = tmp_path / "runs", tmp_path / "docs"
    reproduce.run_all(profile, variants, [0, 1], runs, docs, data_path=data)
    assert calls == [("cls", 0), ("sparo", 0), ("cls", 1), ("sparo", 1)]  # seed-major
    assert json.loads((runs / "sparo_seed1.json").read_text())["flags"] == ["--arch", "vit_tiny_sparo", "--seed", "1"]
    (runs / "sparo_seed1.json").unlink()  # as if killed in that run (a half-written file stays .partial)
    (runs / "sparo_seed1.json.partial").write_text("{")
    calls.clear()
    records = reproduce.run_all(profile, variants, [0, 1], runs, docs, data_path=data)
    assert calls == [("sparo", 1)]
    assert [(r["variant"], r["seed"]) for r in records] == [("cls", 0), ("sparo", 0), ("cls", 1), ("sparo", 1)]
    page = (docs / "readouts.md").read_text()
    assert page.count("| 2026-01-01 | cpu | sparo | 1 |") == 2 and page.count("| 2026-01-01 | cpu | cls | 0 |") == 1
    assert page.count("| cls | vit_tiny (-)") == 1  # the table was replaced, not appended
    # the table holds every finished run in the folder, also when this invocation names fewer
    calls.clear()
    assert [r["variant"] for r in reproduce.run_all(profile, variants[:1], [0], runs, docs, data_path=data)] == ["cls"]
    assert calls == []
    assert "| sparo | vit_tiny_sparo (-) | 192 | 100 | 1,000 | 0, 1 |" in (docs / "readouts.md").read_text()
    # a finished run trained with other flags than its variant has now is not mixed into the row
    with pytest.raises(ValueError, match="sparo_seed0.json was trained with --arch vit_tiny_sparo --seed 0, sparo "
                                         "is now --arch vit_tiny_sparo --num_slots 35 --seed 0: remove it"):
        reproduce.run_all(profile, [Variant("sparo", "vit_tiny_sparo", ("--num_slots", "35"))], [0], runs, docs,
                          data_path=data)


def test_sections_are_replaced_between_their_markers(tmp_path) -> None:
    doc = tmp_path / "readouts.md"
    reproduce.ensure_document(doc)
    reproduce.replace_section(doc, "cpu", "first")
    reproduce.replace_section(doc, "cpu", "second")
    page = doc.read_text()
    assert "second" in page and "first" not in page and page.count("not measured yet") == 1  # the GPU section
    doc.write_text("no markers here")
    with pytest.raises(ValueError, match="must hold the markers <!-- readouts:cpu:begin -->"):
        reproduce.replace_section(doc, "cpu", "x")


@needs_readouts
@needs_fashion_mnist
def test_tiny_profile_end_to_end_writes_table_figure_and_records(tmp_path) -> None:
    """2 read-outs x 1 seed on 64 images for 1 epoch: the records carry what the evaluations wrote, the read-out
    sizes counted by hand, and the table and figure land in the docs folder given."""
    profile = reproduce.Profile("cpu", demo.Profile("tiny", num_train=64, num_test=32, epochs=1, warmup_epochs=0,
                                                    batch_size=16, local_crops=0,
                                                    flags=("--patch_size", "16", "--out_dim", "256", "--lr", "0.01")),
                                linear_epochs=2)
    runs, docs = tmp_path / "runs", tmp_path / "docs"
    records = reproduce.run_all(profile, reproduce.resolve_variants(["cls", "sparo"]), [0], runs, docs,
                                num_workers=0)
    by_name = {record["variant"]: record for record in records}
    assert by_name["cls"]["readout_params"] == BLOCK and by_name["sparo"]["readout_params"] == sparo_count(64)
    assert by_name["cls"]["encoding_dim"] == C and by_name["sparo"]["encoding_dim"] == 64 * 64
    assert by_name["cls"]["feature_kind"] == "cls_last1" and by_name["sparo"]["feature_kind"] == "sparo_encoding"
    for name, record in by_name.items():
        knn = json.loads((runs / f"{name}_seed0" / "knn_checkpoint_teacher.json").read_text())
        linear = json.loads((runs / f"{name}_seed0" / "linear" / "results_linear.json").read_text())
        assert (record["knn_top1"], record["knn_init_top1"]) == (knn["knn"]["20"]["top1"],
                                                                 knn["init_baseline"]["20"]["top1"])
        assert (record["linear_top1"], record["linear_init_top1"]) == (linear["final"]["top1"],
                                                                       linear["init_baseline"]["final"]["top1"])
        assert record["images_per_s"] > 0 and (knn["num_train"], knn["num_test"]) == (64, 32)
        assert json.loads((runs / f"{name}_seed0.json").read_text()) == record
    page = (docs / "readouts.md").read_text()
    assert "| cls | vit_tiny (-) | 192 | 444,864 |" in page and "| sparo | vit_tiny_sparo (num_slots=64" in page
    assert "n/a (1 seed)" in page and page.count("| 0 | `--arch vit_tiny") == 2  # two run-record rows
    assert (docs / "readouts_fmnist_cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_shipped_page_takes_the_tables_and_the_record() -> None:
    """docs/readouts.md holds each profile's markers once and the record's header, so a run fills it in place
    instead of appending a second record table."""
    page = (reproduce.DOCS_DIR / reproduce.DOC_NAME).read_text()
    for profile in reproduce.PROFILES:
        assert all(page.count(marker) == 1 for marker in reproduce.markers(profile))
    assert page.count(reproduce.RECORD_HEADER) == 1 and page.rstrip().endswith("|")
