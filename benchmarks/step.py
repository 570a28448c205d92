"""Training-step throughput of the DINO recipe: the reference path and the fast path in one run, on synthetic crops.

One step = teacher forward on the 2 global crops, student forward on all crops, DINO loss, backward, per-parameter
clipping, last-layer freeze rule, optimizer step, EMA of the teacher: training_step.TrainingStep, the object the
trainer runs, minus the schedule lookup. Crops are random tensors already on the device, so the numbers are the
model's limit, not the data pipeline's (benchmarks/train.py measures the whole trainer).

- reference path: --precision (fp32 by default), eager (main_dino.py --compile false --precision fp32).
- fast path: autocast to --fast_precision (bf16), torch.compile of student, teacher and loss (--compile), fused
  AdamW on CUDA, crops handed over in the autocast dtype as the trainer's device crops are: what main_dino.py runs
  on a GPU by default. Everything else (foreach clipping and EMA, no host sync inside a step) is shared by both
  paths. A compiled path that ran no compiled graph is an error ("not compiled"), not a slow number.

Reported per arch and path: img/s (images, each with all its crops), ms/step, peak memory (CUDA: max allocated;
CPU: the process's peak resident set size so far, which only grows), TFLOP/s from torch.utils.flop_counter on one
step and its share of a bf16 (GPU) / fp32 (CPU) matmul peak measured in the same run; then fast/reference ratios and
a check that the fast path's loss and gradients match the reference within stated tolerances.

--check_only skips the timing: the fast path's loss and gradients against the reference's, and that it ran compiled
(`make gpu-check`'s part compiled-step, at a tiny size).

GPU (the benchmark recipe, 2x224 + 10x96 crops as measured for official DINO): python benchmarks/step.py
CPU smoke size: python benchmarks/step.py --device cpu --archs vit_tiny vit_tiny_sparo --batch_size_per_gpu 4
    --global_size 32 --local_size 16 --local_crops_number 2 --patch_size 8 --out_dim 256 --steps 3 --warmup 1
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import Row, pick_device, synchronize  # noqa: E402

from sparo_dino.cli.config import bool_flag  # noqa: E402
from sparo_dino.cli.train_flags import get_args_parser  # noqa: E402
from sparo_dino.model.networks import build_student_teacher  # noqa: E402
from sparo_dino.train.loss import DINOLoss  # noqa: E402
from sparo_dino.train.optim import build_optimizer, param_groups  # noqa: E402
from sparo_dino.train.progress import memory_mb  # noqa: E402
from sparo_dino.train.step import DTYPES, NUM_GLOBAL_CROPS, TrainingStep  # noqa: E402


@dataclass(frozen=True)
class Tolerance:
    """How far a path's loss and gradients may be from the reference's on the same weights and crops."""
    loss_rtol: float
    grad_min_cosine: float
    grad_max_rel_l2: float

    def __str__(self) -> str:
        return f"loss {self.loss_rtol:g}, cosine >= {self.grad_min_cosine}, rel L2 <= {self.grad_max_rel_l2:g}"


# bf16 autocast vs fp32: bf16 keeps 8 mantissa bits, so single matmuls are off by ~0.4%; through a ViT and a 3-layer
# head the loss moves by well under 1% and the gradient direction stays within a few degrees. Looser than this
# means a bug (wrong crops, weights or loss), not rounding.
PRECISION_TOLERANCE = Tolerance(loss_rtol=1e-2, grad_min_cosine=0.99, grad_max_rel_l2=0.15)
# Compiled vs eager in fp32: Inductor fuses and reorders float sums (measured on CPU, vit_tiny: the same loss, gradients
# 1.8e-6 relative L2); anything near these bounds is a different computation, not reassociation.
COMPILE_TOLERANCE = Tolerance(loss_rtol=1e-5, grad_min_cosine=0.99999, grad_max_rel_l2=1e-4)


def run_config(arch: str, args: argparse.Namespace, drop_path_rate: float | None = None) -> dict[str, Any]:
    """The training CLI's config (its defaults and validation) for this benchmark's model settings."""
    argv = ["--arch", arch, "--patch_size", str(args.patch_size), "--img_size", str(args.global_size),
            "--out_dim", str(args.out_dim), "--local_crops_number", str(args.local_crops_number),
            "--global_crop_size", str(args.global_size), "--local_crop_size", str(args.local_size),
            "--batch_size_per_gpu", str(args.batch_size_per_gpu)]
    config = vars(get_args_parser().parse_args(argv))
    if drop_path_rate is not None:
        config["drop_path_rate"] = drop_path_rate
    return config


def synthetic_crops(config: dict[str, Any], device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """2 global + N local normalized-looking crops (standard normal) of one batch, on the device."""
    g = torch.Generator().manual_seed(seed)
    batch = config["batch_size_per_gpu"]
    sizes = [config["global_crop_size"]] * NUM_GLOBAL_CROPS + [config["local_crop_size"]] * config["local_crops_number"]
    return [torch.randn(batch, 3, s, s, generator=g).to(device) for s in sizes]


def build_step_model(config: dict[str, Any], device: torch.device, precision: str, compile_models: bool,
                     fused_optimizer: bool = False, compile_backend: str = "inductor") -> TrainingStep:
    """A fresh student, teacher, loss and optimizer of `config` (the same weights for every call) in one step."""
    torch.manual_seed(config["seed"])
    student, teacher = build_student_teacher(config)
    student, teacher = student.to(device), teacher.to(device)
    loss = DINOLoss(config["out_dim"], NUM_GLOBAL_CROPS + config["local_crops_number"], config["warmup_teacher_temp"],
                    config["teacher_temp"], config["warmup_teacher_temp_epochs"], config["epochs"]).to(device)
    optimizer = build_optimizer(config["optimizer"], param_groups(student), fused=fused_optimizer)
    return TrainingStep(student, student, teacher, loss, optimizer, precision, device, compiled=compile_models,
                        clip_grad=config["clip_grad"], freeze_last_layer=config["freeze_last_layer"],
                        compile_backend=compile_backend)


def require_compiled(model: TrainingStep, what: str) -> None:
    """A path asked to compile must have run compiled graphs: an eager fallback would time or check the wrong code."""
    if not model.ran_compiled:
        raise RuntimeError(f"{what}: not compiled: torch.compile ran no compiled graph (see the warning above)")


def compile_counts() -> str:
    """torch's own tallies for this process: graphs compiled, and Inductor's FX graph cache hits and misses (hits
    in a later process show that the compile cache it shares with others works)."""
    inductor = counters["inductor"]
    return (f"compiled graphs: {counters['stats']['unique_graphs']}; Inductor FX graph cache: "
            f"{inductor['fxgraph_cache_hit']} hits, {inductor['fxgraph_cache_miss']} misses")


def forward_loss(model: TrainingStep, crops: Sequence[torch.Tensor], epoch: int) -> torch.Tensor:
    return model.forward(crops, epoch).loss


def train_step(model: TrainingStep, crops: Sequence[torch.Tensor], epoch: int = 1) -> torch.Tensor:
    """One full DINO step at the peak lr of a batch of 64 and the base weight decay and momentum; returns the loss
    on the device (no host sync)."""
    return model(crops, epoch, lr=5e-4 * 64 / 256, weight_decay=0.04, momentum=0.996)[0]


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, size: int, reps: int = 10) -> float:
    """Measured dense matmul rate (TFLOP/s) of a size x size product: the ceiling that utilization refers to."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    synchronize(device)
    return 2 * size ** 3 * reps / (time.perf_counter() - start) / 1e12


def step_flops(config: dict[str, Any], device: torch.device, crops: Sequence[torch.Tensor]) -> int:
    """FLOPs of one step (teacher forward, student forward + backward; the optimizer's elementwise work is not
    counted) from torch.utils.flop_counter on an eager fp32 model: the same for every precision."""
    from torch.utils.flop_counter import FlopCounterMode
    model = build_step_model(config, device, "fp32", compile_models=False)
    with FlopCounterMode(display=False) as counter:
        forward_loss(model, crops, epoch=1).backward()
    return counter.get_total_flops()


@dataclass
class Timing:
    images_per_s: float
    ms_per_step: float
    peak_memory_mb: float


def time_path(model: TrainingStep, crops: Sequence[torch.Tensor], steps: int, warmup: int) -> Timing:
    device = model.device
    for _ in range(warmup):  # includes compilation on the fast path
        train_step(model, crops)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = train_step(model, crops)
    synchronize(device)
    elapsed = time.perf_counter() - start
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite loss {float(loss)} in the timed steps")
    batch = crops[0].shape[0]
    return Timing(batch * steps / elapsed, 1000 * elapsed / steps, memory_mb(device))


def compare_paths(config: dict[str, Any], device: torch.device, reference_precision: str, fast_precision: str,
                  compile_models: bool, reference_compiled: bool = False,
                  compile_backend: str = "inductor") -> dict[str, float]:
    """Loss and gradients of the fast path vs the reference path from the same weights and crops (no drop-path,
    which would draw different masks): loss relative difference, cosine and relative L2 error of all gradients.
    RuntimeError if a path asked to compile ran no compiled graph."""
    config = {**config, "drop_path_rate": 0.0}
    crops = synthetic_crops(config, device, seed=1)
    results = []
    for name, precision, compiled in (("reference", reference_precision, reference_compiled),
                                      ("fast", fast_precision, compile_models)):
        model = build_step_model(config, device, precision, compiled, compile_backend=compile_backend)
        loss = forward_loss(model, crops, epoch=1)
        if compiled:
            require_compiled(model, f"{config['arch']} {name} path ({precision}, {compile_backend})")
        loss.backward()
        grads = torch.cat([p.grad.flatten().double() for p in model.trainable_params])
        results.append((loss.detach().double(), grads))
    (ref_loss, ref_grad), (fast_loss, fast_grad) = results
    return {"loss_reference": float(ref_loss), "loss_fast": float(fast_loss),
            "loss_rel_diff": float((fast_loss - ref_loss).abs() / ref_loss.abs()),
            "grad_cosine": float(torch.nn.functional.cosine_similarity(fast_grad, ref_grad, dim=0)),
            "grad_rel_l2": float((fast_grad - ref_grad).norm() / ref_grad.norm())}


def check_passes(result: dict[str, float], tolerance: Tolerance = PRECISION_TOLERANCE) -> bool:
    return (result["loss_rel_diff"] <= tolerance.loss_rtol and result["grad_cosine"] >= tolerance.grad_min_cosine
            and result["grad_rel_l2"] <= tolerance.grad_max_rel_l2)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["vit_small", "vit_small_sparo"])
    parser.add_argument("--batch_size_per_gpu", type=int, default=64)
    parser.add_argument("--global_size", type=int, default=224)
    parser.add_argument("--local_size", type=int, default=96)
    parser.add_argument("--local_crops_number", type=int, default=10,
                        help="the benchmark recipe: 2x224 + 10x96, as measured for official DINO")
    parser.add_argument("--patch_size", type=int, default=16)
    parser.add_argument("--out_dim", type=int, default=65536)
    parser.add_argument("--precision", default="fp32", choices=sorted(DTYPES), help="reference path precision")
    parser.add_argument("--fast_precision", default="bf16", choices=sorted(DTYPES), help="fast path autocast")
    parser.add_argument("--compile", type=bool_flag, default=True, help="torch.compile student, teacher, loss "
                        "on the fast path")
    parser.add_argument("--compile_backend", default="inductor",
                        help="torch.compile backend (aot_eager: dynamo and AOTAutograd without Inductor's code "
                             "generation, which takes minutes per graph on small CPUs)")
    parser.add_argument("--check_only", action="store_true",
                        help="no timing: only the fast vs reference loss and gradients, and that the fast path ran "
                             "compiled")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per path")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:1, cpu")
    parser.add_argument("--matmul_size", type=int, default=None,
                        help="side of the peak-matmul probe (default 8192 on GPU, 2048 on CPU)")
    parser.add_argument("--check", type=bool_flag, default=True, help="compare fast vs reference loss/grads")
    return parser


def check_rows(arch: str, config: dict[str, Any], device: torch.device, args: argparse.Namespace,
               setting: str) -> list[Row]:
    """The fast path's loss and gradients against the reference's: within COMPILE_TOLERANCE where only compiling
    differs, PRECISION_TOLERANCE where the precision does too. One row saying PASS or FAIL."""
    tolerance = COMPILE_TOLERANCE if args.fast_precision == args.precision else PRECISION_TOLERANCE
    result = compare_paths(config, device, args.precision, args.fast_precision, args.compile,
                           compile_backend=args.compile_backend)
    passed = check_passes(result, tolerance)
    verdict = (f"loss_rel_diff={result['loss_rel_diff']:.2e} grad_cosine={result['grad_cosine']:.5f} "
               f"grad_rel_l2={result['grad_rel_l2']:.2e} (tolerance: {tolerance}) {'PASS' if passed else 'FAIL'}")
    print(f"arch={arch} check: {verdict}", flush=True)
    return [Row("step", f"{arch}, {setting}", "fast vs reference loss and gradients", verdict)]


def measure(args: argparse.Namespace) -> list[Row]:
    """Time both paths per arch, print one line per result, and return them as rows (a check row per arch says
    PASS or FAIL); with --check_only the check rows alone."""
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit(f"error: --steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    device = pick_device(args.device)
    setting = (f"batch {args.batch_size_per_gpu}, 2x{args.global_size} + {args.local_crops_number}x{args.local_size}, "
               f"patch {args.patch_size}, out_dim {args.out_dim}")
    if args.check_only:
        rows = [row for arch in args.archs for row in check_rows(arch, run_config(arch, args), device, args, setting)]
        print(compile_counts(), flush=True)
        return rows
    on_gpu = device.type == "cuda"
    peak_dtype = torch.bfloat16 if on_gpu else torch.float32
    name = torch.cuda.get_device_name(device) if on_gpu else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name} | torch {torch.__version__}", flush=True)
    peak = matmul_peak_tflops(device, peak_dtype, args.matmul_size or (8192 if on_gpu else 2048))
    print(f"matmul peak: {peak:.3f} TFLOP/s ({str(peak_dtype).removeprefix('torch.')}, measured)", flush=True)
    memory_kind = "cuda max allocated" if on_gpu else "cpu process peak RSS"
    fused = on_gpu and args.fast_precision != "fp16"  # fp16 needs a GradScaler, not benchmarked here
    rows = [Row("step", "matmul probe", f"peak TFLOP/s ({str(peak_dtype).removeprefix('torch.')})", f"{peak:.3f}")]
    for arch in args.archs:
        config = run_config(arch, args)
        crops = synthetic_crops(config, device)
        flops = step_flops(config, device, crops)
        print(f"arch={arch} flops_per_step={flops / 1e9:.3f} GFLOP", flush=True)
        timings = {}
        for path, precision, compiled in (("reference", args.precision, False),
                                          ("fast", args.fast_precision, args.compile)):
            model = build_step_model(config, device, precision, compiled, fused_optimizer=fused and path == "fast",
                                     compile_backend=args.compile_backend)
            path_crops = crops if path == "reference" else [crop.to(DTYPES[precision]) for crop in crops]
            timing = time_path(model, path_crops, args.steps, args.warmup)
            if compiled:
                require_compiled(model, f"{arch} {path} path")
            timings[path] = timing
            tflops = flops / (timing.ms_per_step / 1000) / 1e12
            print(f"arch={arch} path={path} precision={precision} compile={compiled} img/s={timing.images_per_s:.2f} "
                  f"ms/step={timing.ms_per_step:.1f} peak_mem_MB={timing.peak_memory_mb:.0f} ({memory_kind}) "
                  f"TFLOP/s={tflops:.4f} util={100 * tflops / peak:.1f}%", flush=True)
            path_setting = f"{arch}, {setting}, {path}: {precision}{', compiled' if compiled else ', eager'}"
            rows += [Row("step", path_setting, "img/s", f"{timing.images_per_s:.2f}"),
                     Row("step", path_setting, "ms/step", f"{timing.ms_per_step:.1f}"),
                     Row("step", path_setting, f"peak memory MB ({memory_kind})", f"{timing.peak_memory_mb:.0f}"),
                     Row("step", path_setting, "TFLOP/s (share of the matmul peak)",
                         f"{tflops:.4f} ({100 * tflops / peak:.1f}%)")]
            del model
        ratio = timings["fast"].images_per_s / timings["reference"].images_per_s
        memory_ratio = timings["fast"].peak_memory_mb / timings["reference"].peak_memory_mb
        print(f"arch={arch} ratio fast/reference: img/s x{ratio:.2f} peak_mem x{memory_ratio:.2f}", flush=True)
        rows.append(Row("step", f"{arch}, {setting}", "fast/reference img/s", f"x{ratio:.2f}"))
        if args.check:
            rows += check_rows(arch, config, device, args, setting)
    print(compile_counts(), flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    rows = measure(get_parser().parse_args(argv))
    return 1 if any(row.value.endswith("FAIL") for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
