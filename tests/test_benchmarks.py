"""The benchmark scripts run at tiny size on the CPU and print their fields; the fast step matches the reference."""
from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
NUMBER = r"([0-9.]+(?:e[-+]?[0-9]+)?)"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _field(text: str, pattern: str) -> list[float]:
    found = re.findall(pattern, text)
    assert found, f"no {pattern!r} in:\n{text}"
    return [float(value) for match in found for value in (match if isinstance(match, tuple) else (match,))]


TINY_STEP = ["--device", "cpu", "--batch_size_per_gpu", "2", "--global_size", "16", "--local_size", "8",
             "--local_crops_number", "2", "--patch_size", "8", "--out_dim", "64", "--steps", "1", "--warmup", "1",
             "--matmul_size", "128"]


def test_step_benchmark_prints_throughput_memory_flops_ratios_and_check(capsys):
    step = _load("step")
    # torch.compile works on this CPU but takes minutes per model (over the suite's budget), so the fast path runs
    # as bf16 autocast in eager mode here; test_fast_step_with_compile covers compilation on request.
    assert step.main(TINY_STEP + ["--archs", "vit_tiny", "vit_tiny_sparo", "--compile", "false"]) == 0
    out = capsys.readouterr().out
    assert _field(out, rf"matmul peak: {NUMBER} TFLOP/s \(float32")[0] > 0
    for arch in ("vit_tiny", "vit_tiny_sparo"):
        for path in ("reference", "fast"):
            line = re.search(rf"arch={arch} path={path} .*", out).group(0)
            for name in ("img/s", "ms/step", "peak_mem_MB", "TFLOP/s"):
                assert _field(line, rf"{re.escape(name)}={NUMBER}")[0] > 0
            assert "cpu process peak RSS" in line and _field(line, rf"util={NUMBER}%")[0] > 0
        assert _field(out, rf"arch={arch} flops_per_step={NUMBER} GFLOP")[0] > 0
        assert _field(out, rf"arch={arch} ratio fast/reference: img/s x{NUMBER}")[0] > 0
        assert re.search(rf"arch={arch} check: .* PASS", out)


def test_flops_per_step_match_a_hand_count():
    """Teacher forward + student forward and backward (2x forward) of a linear-dominated model: count the matmuls
    of the patch embedding, blocks and head for the tiny config by hand."""
    step = _load("step")
    args = step.get_parser().parse_args(TINY_STEP + ["--archs", "vit_tiny"])
    config = step.run_config("vit_tiny", args)
    crops = step.synthetic_crops(config, step.torch.device("cpu"))
    d, hidden, batch = 192, 2048, 2

    def backbone(tokens: int) -> int:  # per image: patch embed + 12 blocks (qkv, attn, proj, mlp)
        patches = tokens - 1
        block = 2 * tokens * (3 * d * d + d * d + 8 * d * d) + 2 * 2 * tokens * tokens * d
        return 2 * patches * d * 3 * 64 + 12 * block

    head = 2 * (d * hidden + hidden * hidden + hidden * 256 + 256 * 64)
    global_img, local_img = backbone(1 + 4) + head, backbone(1 + 1) + head
    student = batch * (2 * global_img + 2 * local_img)
    expected = 2 * batch * global_img + 3 * student
    assert step.step_flops(config, step.torch.device("cpu"), crops) == pytest.approx(expected, rel=0.02)


def test_fast_path_loss_and_gradients_match_reference_and_a_wrong_path_fails():
    step = _load("step")
    args = step.get_parser().parse_args(TINY_STEP + ["--archs", "vit_tiny_sparo"])
    config = step.run_config("vit_tiny_sparo", args)
    device = step.torch.device("cpu")
    result = step.compare_paths(config, device, "fp32", "bf16", compile_models=False)
    assert step.check_passes(result), result
    assert result["loss_rel_diff"] > 0  # bf16 really ran: not the fp32 path twice
    same = step.compare_paths(config, device, "fp32", "fp32", compile_models=False)
    assert same["loss_rel_diff"] == 0 and same["grad_rel_l2"] == 0
    assert not step.check_passes({**result, "grad_cosine": 0.9})


@pytest.mark.skipif(not os.environ.get("SPARO_COMPILE_TESTS"),
                    reason="torch.compile of a ViT takes ~3 min on 2 CPU cores; set SPARO_COMPILE_TESTS=1 to run")
def test_fast_step_with_compile():
    step = _load("step")
    args = step.get_parser().parse_args(TINY_STEP + ["--archs", "vit_tiny"])
    result = step.compare_paths(step.run_config("vit_tiny", args), step.torch.device("cpu"), "fp32", "bf16",
                                compile_models=True)
    assert step.check_passes(result), result


def test_knn_benchmark_prints_both_backends_and_ratio(capsys):
    knn = _load("knn")
    assert knn.main(["--num_train", "500", "--dim", "32", "--num_test", "40", "--num_classes", "10",
                     "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for backend in ("faiss", "torch"):
        seconds, rate = _field(out, rf"backend={backend} \(\w+\) s={NUMBER} queries/s={NUMBER}")[:2]
        assert seconds > 0 and rate == pytest.approx(40 / seconds, rel=0.01)
    assert _field(out, rf"ratio faiss/torch: queries/s x{NUMBER}")[0] > 0


def test_knn_benchmark_refuses_a_bank_that_does_not_fit():
    knn = _load("knn")
    with pytest.raises(SystemExit, match=r"1000000000 x 4096 fp32 bank is 15258.8 GiB .* GiB are free"):
        knn.main(["--num_train", "1000000000", "--dim", "4096", "--num_test", "10", "--device", "cpu"])


def test_data_benchmark_prints_both_pipelines_and_ratio(capsys):
    data = _load("data")
    assert data.main(["--synthetic", "12", "--synthetic_size", "48", "--batch_size", "4", "--batches", "2",
                      "--warmup", "1", "--global_size", "32", "--local_size", "16", "--local_crops_number", "2",
                      "--workers", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "device: cpu | tensor pipeline decode on cpu workers" in out
    cpu = _field(out, rf"pipeline=cpu img/s={NUMBER}")[0]
    tensor = _field(out, rf"pipeline=tensor img/s={NUMBER} device=cpu")[0]
    assert _field(out, rf"ratio tensor/cpu: img/s x{NUMBER}")[0] == pytest.approx(tensor / cpu, rel=0.01)


def test_data_benchmark_needs_enough_images(tmp_path):
    data = _load("data")
    with pytest.raises(SystemExit, match="has 3 images but --batch_size 4"):
        data.main(["--synthetic", "3", "--synthetic_size", "40", "--batch_size", "4", "--batches", "1",
                   "--device", "cpu"])
