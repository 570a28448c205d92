"""What only a GPU can show: CUDA's RNG stream across a resume, the pinned-memory copy of the device crops, and the
compiled bf16 step against the eager fp32 one on CUDA kernels. `make gpu-check` runs them on the device machine;
without CUDA they are skipped with that reason (their CPU counterparts run in the default suite)."""
from __future__ import annotations

import os

import pytest
import torch
from test_benchmarks import TINY_STEP, _load
from test_train import EVERY_STEP, TINY, executed_steps, load, run, steps_between

from sparo_dino.cli.train_flags import parse_train_args
from sparo_dino.data.batched_data import DeviceMultiCrop
from sparo_dino.distributed import DistInfo
from sparo_dino.run_config import RunConfig
from sparo_dino.train.trainer import DinoTrainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a GPU: `make gpu-check` runs these on a machine with CUDA")


def _cuda() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def test_resume_on_the_gpu_restores_the_cuda_rng_and_continues_like_the_straight_run(images, tmp_path, capsys):
    """Drop-path draws from CUDA's generator: a resumed run must continue its stream, not restart it. The stream is
    compared exactly; the weights within float noise (CUDA's atomics in backward make bit equality a matter of
    luck even between two straight runs)."""
    flags = ("--compile", "false", "--drop_path_rate", "0.1", "--saveckp_freq", "1")
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    assert run(images, straight, "--epochs", "2", *flags).code == 0
    first = load(os.path.join(straight, "checkpoint0000.pth"))
    assert first["rng"]["cuda"].shape[0] == 1  # one row per rank
    args = parse_train_args([*TINY, "--data_path", images, "--output_dir", resumed, "--epochs", "2", *flags,
                             "--resume", os.path.join(straight, "checkpoint0000.pth")])
    trainer = DinoTrainer(RunConfig.from_flags(args), DistInfo(0, 1, 0, _cuda()))
    assert torch.equal(torch.cuda.get_rng_state(_cuda()), first["rng"]["cuda"][0])
    trainer.data.close()
    capsys.readouterr()
    rerun = run(images, resumed, "--epochs", "2", *flags, *EVERY_STEP, "--resume",
                os.path.join(straight, "checkpoint0000.pth"), capsys=capsys)
    assert rerun.code == 0 and executed_steps(rerun.out) == steps_between((1, 0), (2, 0))
    a, b = load(os.path.join(straight, "checkpoint.pth")), load(os.path.join(resumed, "checkpoint.pth"))
    assert torch.equal(a["rng"]["cuda"], b["rng"]["cuda"])  # the same number of draws from the restored stream
    for key, value in a["student"].items():
        torch.testing.assert_close(b["student"][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_device_crops_from_pinned_batches_equal_the_cpu_crops(images, tmp_path):
    """The GPU path's loader pins each batch and copies it without blocking; the crops made on the GPU from it
    equal the same position's crops made on the CPU (same parameters from the CPU generator; kernels differ only
    in float rounding)."""
    args = parse_train_args([*TINY, "--data_path", images, "--output_dir", str(tmp_path / "run"), "--epochs", "1",
                             "--augmentation", "batched", "--num_workers", "2", "--precision", "fp32"])
    trainer = DinoTrainer(RunConfig.from_flags(args), DistInfo(0, 1, 0, _cuda()))
    trainer.data.start_epoch(0, 0)
    batch = next(iter(trainer.data.loader))
    pixels, sizes = batch[0], batch[1]
    assert pixels.is_pinned()
    on_gpu = trainer.data.crops(batch, 0, 0)
    on_cpu = DeviceMultiCrop(vars(args), args.seed, 0, torch.device("cpu"))(pixels, sizes, 0, 0)
    trainer.data.close()
    assert [c.shape for c in on_gpu] == [c.shape for c in on_cpu]
    for gpu_crop, cpu_crop in zip(on_gpu, on_cpu):
        torch.testing.assert_close(gpu_crop.float().cpu(), cpu_crop, rtol=0, atol=2e-3)


def test_compiled_bf16_step_on_the_gpu_matches_the_eager_fp32_step():
    """The default GPU step (torch.compile with Inductor, bf16 autocast, fused AdamW) against the reference (eager,
    fp32): compiled fp32 within COMPILE_TOLERANCE, compiled bf16 within PRECISION_TOLERANCE, as on the CPU."""
    step = _load("step")
    argv = [value if value != "cpu" else "cuda" for value in TINY_STEP]
    args = step.get_parser().parse_args([*argv, "--archs", "vit_tiny_sparo"])
    config = step.run_config("vit_tiny_sparo", args)
    same_precision = step.compare_paths(config, _cuda(), "fp32", "fp32", compile_models=True)
    assert step.check_passes(same_precision, step.COMPILE_TOLERANCE), same_precision
    fast = step.compare_paths(config, _cuda(), "fp32", "bf16", compile_models=True)
    assert step.check_passes(fast), fast
