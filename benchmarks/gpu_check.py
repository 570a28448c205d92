"""`make gpu-check`: everything a GPU machine must show, as one command that fits a short device loan.

Parts, in order (each a subprocess with its own time limit, all under --deadline_s, 480 s by default):
  gpu-tests       tests/test_gpu.py and the sync-debug test: CUDA RNG across a resume, pinned-memory crops, compiled
                  bf16 step against eager fp32, no host synchronisation in a step
  train-224       main_dino.py --arch vit_small_sparo at 224/96 with every default of the GPU path (device crops,
                  torch.compile, bf16, fused AdamW, 64 per GPU, 8 locals, out_dim 65536) on synthetic JPEGs; SIGTERM
                  after --train_s: it must save and exit 75 (requeue)
  resume-224      the same command again: it must resume from that checkpoint, train, and stop the same way
  fmnist          the Fashion-MNIST GPU profile (experiments.demo --profile gpu) shortened to --fmnist_epochs epochs,
                  with its 20-NN next to the same network's random init and raw pixels
  bench           benchmarks/report.py (`make bench`) at the official shape: vit_small(_sparo), 64 per GPU,
                  2x224 + 10x96 crops
  bad-image       a corrupt image with the default 10 loader workers and crops (pinned batches on a GPU): one
                  error line, exit 1 within seconds
  compile-ddp     (CPU half) torch.compile(DDP(student)) on 2 gloo processes (backend aot_eager) and the compile
                  fallback, with SPARO_COMPILE_TESTS=1
  cpu-gpu-path    (CPU half) the GPU path's flags at tiny size on the CPU, with the same SIGTERM / resume checks

Without CUDA the GPU parts are reported as "skipped: no GPU" and the CPU half runs. Writes one Markdown file to
benchmarks/results/ (the parts' table, then bench's own table) and exits 1 if any part failed or ran out of time.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import write_synthetic_jpegs  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
REQUEUE_EXIT_CODE = 75  # main_dino.py after a stop request: checkpoint written, run again to continue
FASHION_MNIST_PLACES = (os.environ.get("FASHION_MNIST_DIR", ""), "/usr/share/datasets/fashion-mnist",
                        os.path.join(REPO, ".gpu_data", "fashion-mnist"))


@dataclass
class Part:
    """One check: a command, the exit codes that mean success, and what to quote from its output."""
    name: str
    needs_gpu: bool
    command: Sequence[str]
    limit_s: float
    ok_codes: tuple[int, ...] = (0,)
    stop_after_s: float | None = None  # SIGTERM then (a preemption), and expect REQUEUE_EXIT_CODE
    must_print: tuple[str, ...] = ()
    quote: Callable[[str], str] = lambda output: last_line(output)
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Outcome:
    name: str
    status: str  # passed | failed | skipped: ...
    seconds: float
    detail: str


def last_match(output: str, pattern: str) -> str:
    found = re.findall(pattern, output)
    return found[-1] if found else ""


def last_line(output: str, pattern: str = "") -> str:
    """The last output line containing `pattern`, trimmed for a table cell."""
    lines = [line.strip() for line in output.splitlines() if pattern in line and line.strip()]
    return (lines[-1] if lines else "")[:220].replace("|", "/")


def run_part(part: Part, time_left: float, cuda: bool) -> Outcome:
    if part.needs_gpu and not cuda:
        return Outcome(part.name, "skipped: no GPU", 0.0, "")
    limit = min(part.limit_s, time_left)
    if limit < 10:
        return Outcome(part.name, "failed", 0.0, "out of time: the deadline passed before this part")
    print(f"== {part.name}: {' '.join(part.command)} (limit {limit:.0f} s)", flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1", **part.env}
    started = time.monotonic()
    process = subprocess.Popen(list(part.command), cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    chunks: list[str] = []
    reader = threading.Thread(target=_echo, args=(process, chunks), daemon=True)  # a silent hang still times out
    reader.start()
    stop_sent = False
    while process.poll() is None:
        elapsed = time.monotonic() - started
        if part.stop_after_s is not None and not stop_sent and elapsed > part.stop_after_s:
            process.send_signal(signal.SIGTERM)  # as SLURM does before a preemption
            stop_sent = True
        if elapsed > limit:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return Outcome(part.name, "failed", elapsed, f"still running after {limit:.0f} s")
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
        return Outcome(part.name, "failed", seconds, f"{why}; {last_line(output)}")
    return Outcome(part.name, "passed", seconds, part.quote(output))


def _echo(process: subprocess.Popen, chunks: list[str]) -> None:
    for line in process.stdout:
        print(line, end="", flush=True)
        chunks.append(line)


def fashion_mnist_dir() -> str | None:
    return next((path for path in FASHION_MNIST_PLACES if path and os.path.isdir(path) and os.listdir(path)), None)


def plan(args: argparse.Namespace, work: str, images: str, bench_table: str) -> list[Part]:
    python = sys.executable
    pytest = [python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"]
    gpu_run = [python, "main_dino.py", "--arch", "vit_small_sparo", "--data_path", images, "--output_dir",
               os.path.join(work, "train224"), "--epochs", "100", "--num_workers", str(args.workers),
               "--print_freq", "5"]
    cpu_run = [python, "main_dino.py", "--arch", "vit_tiny", "--patch_size", "8", "--img_size", "32",
               "--global_crop_size", "32", "--local_crop_size", "16", "--local_crops_number", "2", "--out_dim", "64",
               "--batch_size_per_gpu", "8", "--epochs", "100", "--num_workers", "1", "--print_freq", "1",
               "--augmentation", "batched", "--precision", "bf16", "--compile", "false", "--fused_adamw", "true",
               "--data_path", images, "--output_dir", os.path.join(work, "cpu_gpu_path")]
    bad_images = os.path.join(work, "bad_images")
    bad_run = [python, "main_dino.py", "--arch", "vit_tiny", "--batch_size_per_gpu", "8", "--epochs", "1",
               "--warmup_epochs", "0",
               "--data_path", bad_images, "--output_dir", os.path.join(work, "bad_run")]  # default workers, crops
    img_per_s = lambda output: last_match(output, r"[0-9.]+ img/s")  # noqa: E731 - the trainer's progress lines
    data = fashion_mnist_dir()
    fmnist = [python, "-m", "experiments.demo", "--profile", "gpu", "--epochs", str(args.fmnist_epochs),
              "--output_dir", os.path.join(work, "fmnist")] + (["--data_path", data] if data else [])
    return [
        Part("gpu-tests", True, [*pytest, "tests/test_gpu.py",
                                 "tests/test_fast_path.py::test_on_a_gpu_crops_and_step_make_the_host_wait_for_nothing"],
             150, quote=lambda output: last_line(output, "passed")),
        Part("train-224", True, gpu_run, 150, stop_after_s=args.train_s, must_print=("stopping",), quote=img_per_s),
        Part("resume-224", True, gpu_run, 120, stop_after_s=args.train_s / 2, must_print=("resumed from",),
             quote=img_per_s),
        Part("fmnist", True, fmnist, 180, quote=lambda output: last_line(output, "20-NN top-1")),
        Part("bench", True, [python, "benchmarks/report.py", "--output", bench_table], 200,
             quote=lambda output: "rows in the bench table below"),
        Part("bad-image", False, bad_run, 90, ok_codes=(1,), must_print=("cannot read image",),
             quote=lambda output: last_line(output, "error:")),
        Part("compile-ddp", False, [*pytest, "tests/test_compile.py"], 300, env={"SPARO_COMPILE_TESTS": "1", "OMP_NUM_THREADS": "1"},
             quote=lambda output: last_line(output, "passed")),
        Part("cpu-gpu-path", False, cpu_run, 120, stop_after_s=20, must_print=("stopping",), quote=img_per_s),
        Part("cpu-gpu-path-resume", False, cpu_run, 90, stop_after_s=10, must_print=("resumed from",),
             quote=img_per_s),
    ]


def markdown(outcomes: Sequence[Outcome], cuda: bool, bench_table: str) -> str:
    import torch

    device = torch.cuda.get_device_name() if cuda else "no GPU"
    lines = [f"# make gpu-check, {time.strftime('%Y-%m-%d %H:%M')}", "",
             f"Machine: {device}; torch {torch.__version__}; {os.cpu_count()} CPUs; python {sys.version.split()[0]}.",
             "", "| part | status | seconds | result |", "| --- | --- | --- | --- |"]
    lines += [f"| {o.name} | {o.status} | {o.seconds:.0f} | {o.detail} |" for o in outcomes]
    if os.path.isfile(bench_table):
        lines += ["", "## make bench", "", open(bench_table).read().strip()]
    return "\n".join(lines) + "\n"


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--deadline_s", type=float, default=480, help="all parts together")
    parser.add_argument("--train_s", type=float, default=75, help="SIGTERM of train-224 after this long")
    parser.add_argument("--fmnist_epochs", type=int, default=2)
    parser.add_argument("--images", type=int, default=1024, help="synthetic JPEGs for the 224/96 runs")
    parser.add_argument("--workers", type=int, default=min(10, os.cpu_count() or 1))
    parser.add_argument("--only", nargs="+", help="run only these parts (names as in the table)")
    parser.add_argument("--output", default=None, help="Markdown file (default: benchmarks/results/...)")
    return parser


def main(argv: Sequence[str] | None = None, cuda: bool | None = None) -> int:
    import torch

    args = get_parser().parse_args(argv)
    cuda = torch.cuda.is_available() if cuda is None else cuda
    deadline = time.monotonic() + args.deadline_s
    with tempfile.TemporaryDirectory(prefix="sparo_gpu_check_") as work:
        images = os.path.join(work, "images")
        write_synthetic_jpegs(images, args.images if cuda else 64, 440 if cuda else 48)
        write_synthetic_jpegs(os.path.join(work, "bad_images"), 32, 64)
        with open(os.path.join(work, "bad_images", "synthetic", "000003.jpg"), "wb") as handle:
            handle.write(b"not a jpeg")  # loader workers must not keep the process alive after its error
        bench_table = os.path.join(work, "bench.md")
        outcomes = [run_part(part, deadline - time.monotonic(), cuda)
                    for part in plan(args, work, images, bench_table) if not args.only or part.name in args.only]
        path = args.output or os.path.join(RESULTS, time.strftime("%Y%m%d-%H%M") +
                                           f"-gpu-check-{'cuda' if cuda else 'cpu'}.md")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as handle:
            handle.write(markdown(outcomes, cuda, bench_table))
    for outcome in outcomes:
        print(f"{outcome.name}: {outcome.status} ({outcome.seconds:.0f} s) {outcome.detail}", flush=True)
    print(f"wrote {path}", flush=True)
    return 1 if any(outcome.status == "failed" for outcome in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
