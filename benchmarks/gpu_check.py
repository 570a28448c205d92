"""`make gpu-check`: what a GPU machine must show, in two device calls of at most 6 minutes each.

A device loan is 15 minutes in all, its start-up included, so the GPU parts run in two stages, one call each
(`--stage 1`, `--stage 2`; docs/gpus.md gives the exact commands). Every part is a subprocess with its own time
limit, and the limits of a stage plus its set-up add up to no more than the stage's deadline (checked when the plan
is built). Parts in order of value:

stage 1
  compiled-step   the compiled step (Inductor, bf16) against the eager fp32 step at a tiny size, and it must have run
                  compiled graphs ("not compiled" otherwise). The one part that also runs without CUDA: tiny, fp32,
                  with the aot_eager backend (Inductor's C++ code generation takes minutes on 2 cores)
  gpu-tests       tests/test_gpu.py (CUDA RNG across a resume, crops from pinned batches) and the no-host-sync test
  train-224       main_dino.py --arch vit_small_sparo at 224/96 with every default of the GPU path (device crops,
                  torch.compile, bf16, fused AdamW, 64 per GPU, out_dim 65536) on synthetic JPEGs; SIGTERM a while
                  after its first progress line: it must save and exit 75 (requeue)
  resume-224      the same command again: it must resume from that checkpoint, train, and stop the same way
stage 2
  fp16-224        the same run with --precision fp16 (GradScaler and fused AdamW: the paper configs' path), stopped
  step            benchmarks/step.py at the official shape (vit_small and vit_small_sparo, 64 per GPU, 2x224 + 10x96,
                  out_dim 65536): img/s of the fast path (compiled bf16) against the reference (eager fp32)
  data            benchmarks/data.py: img/s from JPEGs through the loader, both pipelines; the device multi-crop's
                  aten ops and host ms per batch (this checkout only: the device's copy has no git history)
  bad-image       a corrupt image under the default loader workers (no compile): one error line, exit 1 in seconds
cpu (the CPU half, `make cpu-check`; never part of a loan)
  compile-ddp, cpu-gpu-path, cpu-gpu-path-resume: torch.compile(DDP(student)) on 2 gloo processes, and the GPU
  path's flags at tiny size on the CPU, stopped and resumed

A compiled part fails when its step ran no compiled graph, whatever the cause: the training runs by their
provenance.jsonl (`compiled`, written after the first step), benchmarks/step.py by its own check. What does not fit
in a loan is in `make bench` (benchmarks/report.py): the whole trainer's img/s, the 1.28M x 4096 k-NN bank, the
Fashion-MNIST GPU profile. All parts share one compile cache in the work folder (Inductor's FX graph, AOTAutograd
and autotuning caches, Triton's kernels), so a shape compiled by one part is a cache hit for the next, also in the
second call when the machine is still the same. Each call writes one Markdown table (the parts run so far in this
work folder) to benchmarks/results/ or --output, and exits 1 if a part failed or ran out of time.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import write_synthetic_jpegs  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
WORK_DIR = os.path.join(REPO, ".gpu_check")  # git-ignored; kept between two calls on the same device machine
REQUEUE_EXIT_CODE = 75  # main_dino.py after a stop request: checkpoint written, run again to continue
GPU_STAGES = ("1", "2")
STAGES = (*GPU_STAGES, "cpu")
# One device call: at most 6 minutes. The parts' limits and the set-up must fit in this, with 15 s to spare for
# python's start and the table.
STAGE_DEADLINE_S = 345.0
SETUP_S = 25.0  # synthetic JPEGs (written once per work folder, in parallel) and the bad-image folder
# A tiny step for compiled-step: compiling is what it checks, not speed.
TINY_STEP = ["--archs", "vit_tiny_sparo", "--batch_size_per_gpu", "2", "--global_size", "16", "--local_size", "8",
             "--local_crops_number", "2", "--patch_size", "8", "--out_dim", "64"]


@dataclass
class Part:
    """One check: a command, the exit codes that mean success, and what to quote from its output."""
    name: str
    stage: str  # "1" / "2": one device call each; "cpu": the CPU half
    command: Sequence[str]
    limit_s: float
    needs_gpu: bool = True
    ok_codes: tuple[int, ...] = (0,)
    stop_after_s: float | None = None  # SIGTERM then (a preemption), and expect REQUEUE_EXIT_CODE
    stop_after_line: str = ""  # counted from the first output line holding this ("": from the start)
    must_print: tuple[str, ...] = ()
    quote: Callable[[str], str] = lambda output: last_line(output)
    env: dict[str, str] = field(default_factory=dict)
    fresh_dir: str | None = None  # removed before the part starts (an earlier call's run must not be resumed)
    compiled_run: str | None = None  # output dir whose provenance.jsonl must say that the step ran compiled


@dataclass
class Outcome:
    name: str
    stage: str
    status: str  # passed | failed | skipped: ...
    seconds: float
    limit_s: float
    detail: str


def last_match(output: str, pattern: str) -> str:
    found = re.findall(pattern, output)
    return found[-1] if found else ""


def last_line(output: str, pattern: str = "") -> str:
    """The last output line containing `pattern`, trimmed for a table cell."""
    lines = [line.strip() for line in output.splitlines() if pattern in line and line.strip()]
    return (lines[-1] if lines else "")[:220].replace("|", "/")


def compile_cache_env(work: str) -> dict[str, str]:
    """One compile cache for every part: Inductor's FX graph cache and AOTAutograd's cache (autotuning results sit
    beside the kernels in the same folder) and Triton's kernel cache, all in the work folder."""
    return {"TORCHINDUCTOR_CACHE_DIR": os.path.join(work, "compile_cache", "inductor"),
            "TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1",
            "TRITON_CACHE_DIR": os.path.join(work, "compile_cache", "triton")}


def compiled_problem(output_dir: str) -> str | None:
    """Why a training run's step did not run compiled, from the last record of its provenance.jsonl (written after
    the launch's first step); None when it did."""
    path = os.path.join(output_dir, "provenance.jsonl")
    try:
        with open(path) as handle:
            record = json.loads(handle.read().strip().splitlines()[-1])
    except (OSError, IndexError, ValueError) as error:
        return f"no provenance record in {path} ({type(error).__name__})"
    compiled = record.get("compiled")
    return None if compiled is True else f"not compiled (provenance.jsonl of {output_dir}: compiled {compiled})"


def run_part(part: Part, time_left: float, cuda: bool, env: dict[str, str] | None = None) -> Outcome:
    """Run one part under min(its limit, time_left); `env` (the shared compile cache) goes to its process."""
    def outcome(status: str, seconds: float, detail: str) -> Outcome:
        return Outcome(part.name, part.stage, status, seconds, part.limit_s, detail)

    if part.needs_gpu and not cuda:
        return outcome("skipped: no GPU", 0.0, "")
    limit = min(part.limit_s, time_left)
    if limit < 10:
        return outcome("failed", 0.0, "out of time: the stage's deadline passed before this part")
    if part.fresh_dir:
        shutil.rmtree(part.fresh_dir, ignore_errors=True)
    print(f"== {part.name}: {' '.join(part.command)} (limit {limit:.0f} s)", flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1", **(env or {}), **part.env}
    started = time.monotonic()
    process = subprocess.Popen(list(part.command), cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    chunks: list[str] = []
    marker_seen: list[float] = []  # when the output first held stop_after_line
    reader = threading.Thread(target=_echo, args=(process, chunks, part.stop_after_line, marker_seen), daemon=True)
    reader.start()  # a silent hang still times out
    stop_sent = False
    while process.poll() is None:
        now = time.monotonic()
        counted_from = marker_seen[0] if marker_seen else (None if part.stop_after_line else started)
        if part.stop_after_s is not None and not stop_sent and counted_from is not None and \
                now - counted_from > part.stop_after_s:
            process.send_signal(signal.SIGTERM)  # as SLURM does before a preemption
            stop_sent = True
        if now - started > limit:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            reader.join(timeout=10)
            return outcome("failed", now - started, f"still running after {limit:.0f} s; {last_line(''.join(chunks))}")
        time.sleep(0.2)
    reader.join(timeout=10)
    code = process.returncode
    output = "".join(chunks)
    seconds = time.monotonic() - started
    expected = (REQUEUE_EXIT_CODE,) if part.stop_after_s is not None else part.ok_codes
    missing = [text for text in part.must_print if text not in output]
    if code not in expected or missing:
        why = f"exit {code} (expected {' or '.join(map(str, expected))})" if code not in expected else \
            f"never printed {missing[0]!r}"
        return outcome("failed", seconds, f"{why}; {last_line(output)}")
    problem = compiled_problem(part.compiled_run) if part.compiled_run else None
    if problem:
        print(f"{part.name}: {problem}", flush=True)
        return outcome("failed", seconds, problem)
    return outcome("passed", seconds, part.quote(output))


def _echo(process: subprocess.Popen, chunks: list[str], marker: str, marker_seen: list[float]) -> None:
    for line in process.stdout:
        print(line, end="", flush=True)
        chunks.append(line)
        if marker and not marker_seen and marker in line:
            marker_seen.append(time.monotonic())


def plan(args: argparse.Namespace, work: str, cuda: bool) -> list[Part]:
    """Every part, in order of value within each stage; with CUDA, ValueError if a GPU stage's limits exceed one
    device call's deadline."""
    python = sys.executable
    pytest = [python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"]
    images, bad_images, runs = (os.path.join(work, name) for name in ("images", "bad_images", "runs"))
    img_per_s = lambda output: last_match(output, r"[0-9.]+ img/s")  # noqa: E731 - the trainer's progress lines

    def gpu_run(name: str, *flags: str) -> list[str]:
        return [python, "main_dino.py", "--arch", "vit_small_sparo", "--data_path", images, "--output_dir",
                os.path.join(runs, name), "--epochs", "100", "--num_workers", str(args.workers), "--print_freq", "5",
                *flags]

    cpu_run = [python, "main_dino.py", "--arch", "vit_tiny", "--patch_size", "8", "--img_size", "32",
               "--global_crop_size", "32", "--local_crop_size", "16", "--local_crops_number", "2", "--out_dim", "64",
               "--batch_size_per_gpu", "8", "--epochs", "100", "--num_workers", "1", "--print_freq", "1",
               "--augmentation", "batched", "--precision", "bf16", "--compile", "false", "--fused_adamw", "true",
               "--data_path", images, "--output_dir", os.path.join(runs, "cpu_gpu_path")]
    bad_run = [python, "main_dino.py", "--arch", "vit_tiny", "--batch_size_per_gpu", "8", "--epochs", "1",
               "--warmup_epochs", "0", "--compile", "false", "--data_path", bad_images,
               "--output_dir", os.path.join(runs, "bad_image")]  # default workers, crops and precision
    compiled_step = [python, "benchmarks/step.py", "--check_only", *TINY_STEP] + (
        ["--device", "cuda"] if cuda else ["--device", "cpu", "--fast_precision", "fp32", "--compile_backend",
                                           "aot_eager"])
    sync_test = "tests/test_fast_path.py::test_on_a_gpu_crops_and_step_make_the_host_wait_for_nothing"
    compiled_in_step = "tests/test_gpu.py::test_compiled_bf16_step_on_the_gpu_matches_the_eager_fp32_step"
    passed = lambda output: last_line(output, "passed")  # noqa: E731
    parts = [
        Part("compiled-step", "1", compiled_step, 70 if cuda else 300, needs_gpu=False, must_print=("PASS",),
             quote=lambda output: f"{last_line(output, 'check:')} / {last_line(output, 'compiled graphs')}"),
        Part("gpu-tests", "1", [*pytest, "tests/test_gpu.py", sync_test, "--deselect", compiled_in_step], 50,
             quote=passed),
        Part("train-224", "1", gpu_run("train224"), 125, stop_after_s=20, stop_after_line="img/s",
             must_print=("stopping",), quote=img_per_s, fresh_dir=os.path.join(runs, "train224"),
             compiled_run=os.path.join(runs, "train224")),
        Part("resume-224", "1", gpu_run("train224"), 75, stop_after_s=15, stop_after_line="img/s",
             must_print=("resumed from", "stopping"), quote=img_per_s, compiled_run=os.path.join(runs, "train224")),
        Part("fp16-224", "2", gpu_run("fp16", "--precision", "fp16"), 115, stop_after_s=30, stop_after_line="img/s",
             must_print=("stopping",), quote=img_per_s, fresh_dir=os.path.join(runs, "fp16"),
             compiled_run=os.path.join(runs, "fp16")),
        Part("step", "2", [python, "benchmarks/step.py", "--steps", "10", "--warmup", "3", "--check", "false"], 145,
             quote=lambda output: " / ".join(re.findall(r"arch=\S+ ratio fast/reference: img/s x[0-9.]+", output))),
        Part("data", "2", [python, "benchmarks/data.py", "--data_path", images, "--workers", str(args.workers),
                           "--batches", "8", "--baseline", "", "--host_rounds", "1"], 35,  # no older revision
             quote=lambda output: " / ".join(re.findall(r"pipeline=\S+ img/s=[0-9.]+|aten ops per batch: \d+|"
                                                        r"host ms per batch: [0-9.]+", output))),
        Part("bad-image", "2", bad_run, 25, ok_codes=(1,), must_print=("cannot read image",),
             quote=lambda output: last_line(output, "error:"), fresh_dir=os.path.join(runs, "bad_image")),
        Part("compile-ddp", "cpu", [*pytest, "tests/test_compile.py"], 300, needs_gpu=False,
             env={"SPARO_COMPILE_TESTS": "1", "OMP_NUM_THREADS": "1"}, quote=passed),
        Part("cpu-gpu-path", "cpu", cpu_run, 120, needs_gpu=False, stop_after_s=20, must_print=("stopping",),
             quote=img_per_s, fresh_dir=os.path.join(runs, "cpu_gpu_path")),
        Part("cpu-gpu-path-resume", "cpu", cpu_run, 90, needs_gpu=False, stop_after_s=10,
             must_print=("resumed from",), quote=img_per_s),
    ]
    if cuda:  # without CUDA no loan is spent: compiled-step alone runs, with a limit for small CPUs
        check_budget(parts)
    return parts


def check_budget(parts: Sequence[Part], deadline_s: float = STAGE_DEADLINE_S, setup_s: float = SETUP_S) -> None:
    """ValueError unless every GPU stage's part limits plus its set-up fit in one call's deadline."""
    for stage in GPU_STAGES:
        total = sum(part.limit_s for part in parts if part.stage == stage)
        if total + setup_s > deadline_s:
            raise ValueError(f"stage {stage}: part limits {total:.0f} s + set-up {setup_s:.0f} s exceed the "
                             f"{deadline_s:.0f} s deadline of one device call")


def select(parts: Sequence[Part], stage: str | None, only: Sequence[str] | None) -> list[Part]:
    """--only names (any stage), else --stage, else both GPU stages: the CPU half runs only when asked for."""
    if only:
        unknown = sorted(set(only) - {part.name for part in parts})
        if unknown:
            raise SystemExit(f"error: unknown part(s) {', '.join(unknown)}; parts: "
                             f"{', '.join(part.name for part in parts)}")
        return [part for part in parts if part.name in only]
    stages = (stage,) if stage else GPU_STAGES
    return [part for part in parts if part.stage in stages]


def run_stages(parts: Sequence[Part], cuda: bool, env: dict[str, str], started: float,
               deadline_s: float = STAGE_DEADLINE_S,
               done: Callable[[list[Outcome]], None] = lambda outcomes: None) -> list[Outcome]:
    """The parts in order; each GPU stage gets `deadline_s` from when it starts (the first from `started`, so the
    set-up counts), a part at most what is left of it. `done` sees the outcomes after each part."""
    outcomes: list[Outcome] = []
    stage, deadline = None, float("inf")
    for part in parts:
        if part.stage != stage:
            stage = part.stage
            stage_started = time.monotonic() if outcomes else started
            deadline = stage_started + deadline_s if stage in GPU_STAGES else float("inf")
        outcomes.append(run_part(part, deadline - time.monotonic(), cuda, env))
        done(outcomes)
    return outcomes


def set_up(work: str, parts: Sequence[Part], cuda: bool) -> None:
    """Synthetic JPEGs for the 224/96 runs and data (kept in the work folder for the next call) and the bad-image
    folder: what the selected parts need."""
    names = {part.name for part in parts if cuda or not part.needs_gpu}
    if names & {"train-224", "resume-224", "fp16-224", "data", "cpu-gpu-path", "cpu-gpu-path-resume"}:
        count, size = (1024, 440) if cuda else (64, 48)
        images, done = os.path.join(work, "images"), os.path.join(work, "images", f".complete-{count}-{size}")
        if not os.path.isfile(done):
            shutil.rmtree(images, ignore_errors=True)
            write_synthetic_jpegs(images, count, size, processes=min(16, os.cpu_count() or 1))
            open(done, "w").close()
    if "bad-image" in names:
        bad_images = os.path.join(work, "bad_images")
        shutil.rmtree(bad_images, ignore_errors=True)
        write_synthetic_jpegs(bad_images, 32, 64)
        with open(os.path.join(bad_images, "synthetic", "000003.jpg"), "wb") as handle:
            handle.write(b"not a jpeg")  # loader workers must not keep the process alive after its error


def record(work: str, outcomes: Sequence[Outcome], fresh: bool) -> list[Outcome]:
    """This call's outcomes merged into those the work folder holds (a second call on the same machine adds its
    stage to the first's table); `fresh` drops what earlier calls left (a call that runs stage 1)."""
    path = os.path.join(work, "outcomes.json")
    known: dict[str, dict] = {}
    if not fresh and os.path.isfile(path):
        with open(path) as handle:
            known = json.load(handle)
    known.update({outcome.name: asdict(outcome) for outcome in outcomes})
    with open(path, "w") as handle:
        json.dump(known, handle, indent=1)
    return [Outcome(**value) for value in known.values()]


def markdown(outcomes: Sequence[Outcome], cuda: bool, order: Sequence[str]) -> str:
    import torch

    device = torch.cuda.get_device_name() if cuda else "no GPU"
    rank = {name: index for index, name in enumerate(order)}
    lines = [f"# make gpu-check, {time.strftime('%Y-%m-%d %H:%M')}", "",
             f"Machine: {device}; torch {torch.__version__}; {os.cpu_count()} CPUs; python {sys.version.split()[0]}.",
             "", "| stage | part | status | seconds | limit s | result |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {o.stage} | {o.name} | {o.status} | {o.seconds:.0f} | {o.limit_s:.0f} | {o.detail} |"
              for o in sorted(outcomes, key=lambda o: rank.get(o.name, len(rank)))]
    return "\n".join(lines) + "\n"


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--stage", choices=STAGES, default=None,
                        help="one device call's parts (default: stage 1 then stage 2); cpu: the CPU half")
    parser.add_argument("--only", nargs="+", help="run only these parts (names as in the table)")
    parser.add_argument("--workers", type=int, default=min(10, os.cpu_count() or 1))
    parser.add_argument("--work_dir", default=WORK_DIR,
                        help="compile cache, JPEGs, runs and outcomes (git-ignored; kept between two calls)")
    parser.add_argument("--output", default=None, help="Markdown file (default: benchmarks/results/...)")
    return parser


def main(argv: Sequence[str] | None = None, cuda: bool | None = None) -> int:
    started = time.monotonic()
    import torch

    args = get_parser().parse_args(argv)
    cuda = torch.cuda.is_available() if cuda is None else cuda
    work = os.path.abspath(args.work_dir)
    os.makedirs(work, exist_ok=True)
    parts = plan(args, work, cuda)
    selected = select(parts, args.stage, args.only)
    path = args.output or os.path.join(RESULTS, time.strftime("%Y%m%d-%H%M") +
                                       f"-gpu-check-{'cuda' if cuda else 'cpu'}.md")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fresh = any(part.stage == "1" for part in selected) and not args.only

    def write_table(outcomes: list[Outcome]) -> None:  # after every part: a call cut short still returns its rows
        with open(path, "w") as handle:
            handle.write(markdown(record(work, outcomes, fresh), cuda, [part.name for part in parts]))

    write_table([])
    set_up(work, selected, cuda)
    outcomes = run_stages(selected, cuda, compile_cache_env(work), started, done=write_table)
    for outcome in outcomes:
        print(f"{outcome.name}: {outcome.status} ({outcome.seconds:.0f} s) {outcome.detail}", flush=True)
    print(f"wrote {path}", flush=True)
    return 1 if any(outcome.status == "failed" for outcome in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
