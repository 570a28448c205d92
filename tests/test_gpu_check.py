"""`make gpu-check`'s runner on the CPU: GPU parts are reported as skipped, a part fails on a wrong exit code, a
missing line, a hang past its limit or a run whose step was not compiled, a preempted part must save and exit 75,
the two GPU stages each fit one device call, and the compiled-step part fails when nothing compiled."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_benchmarks import _load

gpu_check = _load("gpu_check")
PYTHON = sys.executable
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Exits 75 on SIGTERM after printing "stopping", as main_dino.py does after a preemption request.
PREEMPTIBLE = ("import signal, sys, time\n"
               "signal.signal(signal.SIGTERM, lambda *_: (print('stopping', flush=True), sys.exit(75)))\n"
               "print('compiling', flush=True)\n"
               "time.sleep(float(sys.argv[1]))\n"
               "print('12.5 img/s', flush=True)\n"
               "time.sleep(60)\n")


def part(command: str, limit_s: float = 30, **options) -> "gpu_check.Part":
    return gpu_check.Part("x", options.pop("stage", "1"), [PYTHON, "-c", command], limit_s,
                          needs_gpu=options.pop("needs_gpu", False), **options)


def plan(tmp_path, cuda: bool = True) -> list:
    return gpu_check.plan(gpu_check.get_parser().parse_args([]), str(tmp_path), cuda)


def test_gpu_parts_are_skipped_without_cuda_and_cpu_parts_run() -> None:
    assert gpu_check.run_part(part("raise SystemExit(3)", needs_gpu=True), 100, cuda=False).status == \
        "skipped: no GPU"
    outcome = gpu_check.run_part(part("print('1 passed')"), 100, cuda=False)
    assert (outcome.status, outcome.detail) == ("passed", "1 passed")


def test_a_part_fails_on_its_exit_code_a_missing_line_a_hang_or_no_time_left() -> None:
    failing = gpu_check.run_part(part("print('boom'); raise SystemExit(3)"), 100, cuda=False)
    assert failing.status == "failed" and failing.detail.startswith("exit 3 (expected 0); boom")
    silent = gpu_check.run_part(part("pass", must_print=("resumed",)), 100, cuda=False)
    assert silent.status == "failed" and "never printed 'resumed'" in silent.detail
    hung = gpu_check.run_part(part("print('compiling', flush=True); import time; time.sleep(60)", 11), 100,
                              cuda=False)
    assert hung.status == "failed" and hung.detail == "still running after 11 s; compiling" and hung.seconds < 20
    late = gpu_check.run_part(part("pass"), 5, cuda=False)
    assert late.status == "failed" and "out of time" in late.detail


def test_a_preempted_part_must_save_and_exit_75_and_is_stopped_after_its_first_progress_line() -> None:
    """SIGTERM comes stop_after_s after the first line holding stop_after_line, so a slow first step (a cold
    compile) still leaves the run its seconds of training."""
    command = [PYTHON, "-c", PREEMPTIBLE, "3"]
    preempted = gpu_check.Part("x", "1", command, 30, needs_gpu=False, stop_after_s=1, stop_after_line="img/s",
                               must_print=("stopping",),
                               quote=lambda output: gpu_check.last_match(output, r"[0-9.]+ img/s"))
    outcome = gpu_check.run_part(preempted, 100, cuda=False)
    assert (outcome.status, outcome.detail) == ("passed", "12.5 img/s") and 4 <= outcome.seconds < 15
    not_preemptible = part("import time; time.sleep(3)", stop_after_s=1)
    assert gpu_check.run_part(not_preemptible, 100, cuda=False).detail.startswith("exit -15 (expected 75)")


def test_a_run_whose_step_did_not_run_compiled_fails_by_its_provenance(tmp_path) -> None:
    """The training parts read the provenance record the trainer writes after the first step: compiled false (an
    eager fallback, TORCH_COMPILE_DISABLE=1) or no record fails the part, whatever its exit code."""
    def run_writing(compiled) -> "gpu_check.Outcome":
        record = json.dumps({"compiled": compiled})
        command = f"open({str(tmp_path / 'provenance.jsonl')!r}, 'a').write({record!r} + '\\n')"
        return gpu_check.run_part(part(command, compiled_run=str(tmp_path)), 100, cuda=False)

    assert run_writing(True).status == "passed"
    eager = run_writing(False)
    assert eager.status == "failed" and eager.detail.startswith("not compiled (provenance.jsonl of ")
    assert run_writing(None).detail.endswith("compiled None)")  # a launch that ran no step
    assert "no provenance record" in gpu_check.compiled_problem(str(tmp_path / "missing"))


def test_each_gpu_stage_fits_one_device_call_and_the_parts_are_ordered_by_value(tmp_path) -> None:
    """At most 6 minutes per call: the limits of a stage plus its set-up within the stage's deadline, checked when
    the plan is built; the k-NN bank and the whole-trainer benchmark are not in a loan."""
    parts = plan(tmp_path)
    assert gpu_check.STAGE_DEADLINE_S <= 360
    stages = {stage: [p.name for p in parts if p.stage == stage] for stage in gpu_check.STAGES}
    assert stages == {"1": ["compiled-step", "gpu-tests", "train-224", "resume-224"],
                      "2": ["fp16-224", "step", "data", "bad-image"],
                      "cpu": ["compile-ddp", "cpu-gpu-path", "cpu-gpu-path-resume"]}
    for stage in gpu_check.GPU_STAGES:
        total = sum(p.limit_s for p in parts if p.stage == stage)
        assert total + gpu_check.SETUP_S <= gpu_check.STAGE_DEADLINE_S, stage
    assert not any("report.py" in " ".join(p.command) or "knn" in " ".join(p.command) for p in parts)
    bad_image = next(p for p in parts if p.name == "bad-image")
    assert bad_image.command[bad_image.command.index("--compile") + 1] == "false"
    one_more = gpu_check.Part("extra", "2", ["true"], 1)
    with pytest.raises(ValueError, match=r"stage 2: part limits 321 s \+ set-up 25 s exceed the 345 s deadline"):
        gpu_check.check_budget([*parts, one_more])


def test_a_cuda_machine_runs_the_gpu_stages_only_and_the_cpu_half_is_its_own_stage(tmp_path) -> None:
    parts = plan(tmp_path)
    names = lambda selected: [p.name for p in selected]  # noqa: E731
    assert names(gpu_check.select(parts, None, None)) == [p.name for p in parts if p.stage in ("1", "2")]
    assert names(gpu_check.select(parts, "2", None)) == ["fp16-224", "step", "data", "bad-image"]
    assert names(gpu_check.select(parts, "cpu", None)) == ["compile-ddp", "cpu-gpu-path", "cpu-gpu-path-resume"]
    assert names(gpu_check.select(parts, "1", ["step", "compiled-step"])) == ["compiled-step", "step"]
    with pytest.raises(SystemExit, match="unknown part.s. bench"):
        gpu_check.select(parts, None, ["bench"])
    cpu_plan = {p.name: p for p in plan(tmp_path, cuda=False)}
    assert all(p.needs_gpu for p in cpu_plan.values() if p.stage in ("1", "2") and p.name != "compiled-step")
    assert "aot_eager" in cpu_plan["compiled-step"].command and "--device" in cpu_plan["compiled-step"].command


def test_a_stage_stops_at_its_deadline_the_next_starts_its_own_and_all_share_one_compile_cache(tmp_path) -> None:
    """The first stage's deadline counts from the call's start (its set-up included); a part gets what is left, one
    under 10 s is out of time; stage 2 gets a deadline of its own; every part sees the work folder's cache."""
    env = gpu_check.compile_cache_env(str(tmp_path))
    assert env["TORCHINDUCTOR_CACHE_DIR"].startswith(str(tmp_path)) and env["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "1"
    assert env["TRITON_CACHE_DIR"].startswith(str(tmp_path))
    show_cache = "import os; print(os.environ['TORCHINDUCTOR_CACHE_DIR'], os.environ['TRITON_CACHE_DIR'])"
    parts = [part("import time; time.sleep(4)", stage="1"), part(show_cache, stage="1"),
             part(show_cache, stage="2")]
    started = gpu_check.time.monotonic() - 1  # the set-up took a second
    outcomes = gpu_check.run_stages(parts, False, env, started, deadline_s=14)
    assert [o.status for o in outcomes] == ["passed", "failed", "passed"]
    assert "out of time" in outcomes[1].detail
    assert outcomes[2].detail == f"{env['TORCHINDUCTOR_CACHE_DIR']} {env['TRITON_CACHE_DIR']}"


def test_a_second_call_adds_its_stage_to_the_first_calls_table(tmp_path) -> None:
    first = gpu_check.Outcome("train-224", "1", "passed", 80, 125, "900 img/s")
    second = gpu_check.Outcome("step", "2", "failed", 145, 145, "still running after 145 s")
    gpu_check.record(str(tmp_path), [first], fresh=True)
    table = gpu_check.markdown(gpu_check.record(str(tmp_path), [second], fresh=False), False,
                               ["train-224", "step"])
    assert "| 1 | train-224 | passed | 80 | 125 | 900 img/s |\n| 2 | step | failed | 145 | 145 |" in table
    assert len(gpu_check.record(str(tmp_path), [second], fresh=True)) == 1  # a new stage 1 starts over


def test_without_a_gpu_the_table_says_so_and_the_check_passes(tmp_path) -> None:
    output = tmp_path / "check.md"
    argv = ["--only", "gpu-tests", "train-224", "step", "--work_dir", str(tmp_path / "work"), "--output", str(output)]
    assert gpu_check.main(argv, cuda=False) == 0
    table = output.read_text()
    for name in ("gpu-tests", "train-224", "step"):
        assert f"| {name} | skipped: no GPU | 0 |" in table
    assert "Machine: no GPU" in table


def test_the_gpu_parts_import_nothing_the_device_image_lacks() -> None:
    """The device image has torch, torchvision, timm and pytest, but no faiss and no submitit: with both unimportable,
    every script a GPU part runs imports, and the GPU tests are collected."""
    script = ("import importlib.util, sys\n"
              "sys.modules.update(faiss=None, submitit=None)\n"
              "sys.path[:0] = ['benchmarks', '.']\n"
              "import main_dino, step, data\n"
              "import pytest\n"
              "sys.exit(pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', 'tests/test_gpu.py',"
              " 'tests/test_fast_path.py']))\n")
    result = subprocess.run([PYTHON, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "test_on_a_gpu_crops_and_step_make_the_host_wait_for_nothing" in result.stdout


def _compiled_step(tmp_path, **env: str) -> subprocess.CompletedProcess:
    command = [PYTHON, "benchmarks/gpu_check.py", "--only", "compiled-step", "--work_dir", str(tmp_path / "work"),
               "--output", str(tmp_path / "check.md")]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", **env})


def test_compiled_step_fails_loudly_when_nothing_compiled(tmp_path) -> None:
    """TORCH_COMPILE_DISABLE=1: torch.compile raises nothing and runs eagerly; the part must not pass at eager speed."""
    result = _compiled_step(tmp_path, TORCH_COMPILE_DISABLE="1")
    assert result.returncode == 1, result.stdout[-3000:]
    summary = [line for line in result.stdout.splitlines() if line.startswith("compiled-step: failed")]
    assert summary and "not compiled" in summary[0], result.stdout[-3000:]


def test_compiled_step_passes_when_the_step_compiles(tmp_path) -> None:
    """The tiny CPU size (vit_tiny_sparo, aot_eager: dynamo and AOTAutograd without Inductor's codegen)."""
    result = _compiled_step(tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "| 1 | compiled-step | passed |" in (tmp_path / "check.md").read_text()
