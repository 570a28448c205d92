"""`make gpu-check`'s runner on the CPU: GPU parts are reported as skipped, a part fails on a wrong exit code, a
missing line or a hang past its limit, a preempted part must save and exit 75, and one table is written."""
from __future__ import annotations

import sys

from test_benchmarks import _load

gpu_check = _load("gpu_check")
PYTHON = sys.executable
# Exits 75 on SIGTERM after printing "stopping", as main_dino.py does after a preemption request.
PREEMPTIBLE = ("import signal, sys, time\n"
               "signal.signal(signal.SIGTERM, lambda *_: (print('stopping', flush=True), sys.exit(75)))\n"
               "print('12.5 img/s', flush=True)\n"
               "time.sleep(60)\n")


def test_gpu_parts_are_skipped_without_cuda_and_cpu_parts_run() -> None:
    gpu = gpu_check.Part("gpu", True, [PYTHON, "-c", "raise SystemExit(3)"], 30)
    cpu = gpu_check.Part("cpu", False, [PYTHON, "-c", "print('1 passed')"], 30)
    assert gpu_check.run_part(gpu, 100, cuda=False).status == "skipped: no GPU"
    outcome = gpu_check.run_part(cpu, 100, cuda=False)
    assert (outcome.status, outcome.detail) == ("passed", "1 passed")


def test_a_part_fails_on_its_exit_code_a_missing_line_a_hang_or_no_time_left() -> None:
    failing = gpu_check.run_part(gpu_check.Part("x", False, [PYTHON, "-c", "print('boom'); raise SystemExit(3)"],
                                                30), 100, cuda=False)
    assert failing.status == "failed" and failing.detail.startswith("exit 3 (expected 0); boom")
    silent = gpu_check.run_part(gpu_check.Part("x", False, [PYTHON, "-c", "pass"], 30, must_print=("resumed",)),
                                100, cuda=False)
    assert silent.status == "failed" and "never printed 'resumed'" in silent.detail
    hung = gpu_check.run_part(gpu_check.Part("x", False, [PYTHON, "-c", "import time; time.sleep(60)"], 11),
                              100, cuda=False)
    assert hung.status == "failed" and hung.detail == "still running after 11 s" and hung.seconds < 20
    late = gpu_check.run_part(gpu_check.Part("x", False, [PYTHON, "-c", "pass"], 30), 5, cuda=False)
    assert late.status == "failed" and "out of time" in late.detail


def test_a_preempted_part_must_save_and_exit_75() -> None:
    part = gpu_check.Part("x", False, [PYTHON, "-c", PREEMPTIBLE], 30, stop_after_s=1, must_print=("stopping",),
                          quote=lambda output: gpu_check.last_match(output, r"[0-9.]+ img/s"))
    outcome = gpu_check.run_part(part, 100, cuda=False)
    assert (outcome.status, outcome.detail) == ("passed", "12.5 img/s") and outcome.seconds < 15
    not_preemptible = gpu_check.Part("x", False, [PYTHON, "-c", "import time; time.sleep(3)"], 30, stop_after_s=1)
    assert gpu_check.run_part(not_preemptible, 100, cuda=False).detail.startswith("exit -15 (expected 75)")


def test_without_a_gpu_the_table_says_so_and_the_check_passes(tmp_path) -> None:
    output = tmp_path / "check.md"
    assert gpu_check.main(["--only", "gpu-tests", "train-224", "bench", "--output", str(output)], cuda=False) == 0
    table = output.read_text()
    for part in ("gpu-tests", "train-224", "bench"):
        assert f"| {part} | skipped: no GPU | 0 |  |" in table
    assert "Machine: no GPU" in table
