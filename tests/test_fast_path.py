"""The fast path main_dino.py runs on GPUs (device-side multi-crop, compiled step, fused AdamW, asynchronous stop
poll) against the reference path (PIL multi-crop in the workers, eager step), proven on the CPU.

- data: the batched pipeline's crops are the recipe (BatchedMultiCrop) applied to the sampler's images in order, from a
  generator seeded by (seed, epoch, iteration, rank), whatever the worker count or the start position; both pipelines
  feed the same images in the same order with the same crop statistics; large JPEGs are decoded reduced, no smaller
  than the crops need;
- training: a mid-epoch resume with --augmentation batched is bit-exact; short runs of both pipelines reach the same
  loss and k-NN within the spread of seeds;
- step: fused AdamW equals the foreach update; a whole epoch reads nothing from the device except at its logging
  interval (a dispatch mode that treats the networks' tensors and the image batch as device tensors);
- stop: the asynchronous poll GPUs use stops every rank after the same step, one step after the request.
Compiled vs eager and bf16 vs fp32 on one step: tests/test_benchmarks.py (benchmarks/step.py's check).
"""
from __future__ import annotations

import json
import math
import os
import sys
import traceback
import weakref

import numpy as np
import pytest
import torch
from conftest import make_image_folder
from PIL import Image
from test_train import EVERY_STEP, TINY, assert_same_training_state, executed_steps, logged_epochs, run, steps_between
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DistributedSampler
from torchvision.datasets import ImageFolder
from torchvision.transforms.v2.functional import pil_to_tensor

import main_dino
from sparo_dino.cli.train_flags import parse_train_args
from sparo_dino.data.batched_augmentation import BatchedMultiCrop, pad_images
from sparo_dino.data.batched_data import DeviceMultiCrop, load_rgb_image_reduced, min_decode_area, pack_images
from sparo_dino.data.datasets import FASHION_MNIST_DIR, BadImageError, write_fashion_mnist_subset
from sparo_dino.data.loader import TrainingData, resolve_augmentation
from sparo_dino.distributed import DistInfo
from sparo_dino.run_config import RunConfig
from sparo_dino.train.optim import build_optimizer, param_groups
from sparo_dino.train.preemption import StopRequest
from sparo_dino.train.progress import MetricSums
from sparo_dino.train.step import TrainingStep, resolve_compile
from sparo_dino.train.trainer import DinoTrainer

BATCHED = ("--augmentation", "batched")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import agreement  # noqa: E402


def config(data: str, *extra: str) -> dict:
    return vars(parse_train_args([*TINY, "--data_path", data, *extra]))


# ----------------------------------------------------------------------------------------------------- flags
def test_auto_picks_the_fast_path_on_gpus_only() -> None:
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert resolve_augmentation("auto", cuda) == "batched" and resolve_augmentation("auto", cpu) == "per_image"
    assert resolve_augmentation("batched", cpu) == "batched" and resolve_augmentation("per_image", cuda) == "per_image"
    assert resolve_compile("auto", cuda) and not resolve_compile("auto", cpu)
    assert resolve_compile("true", cpu) and not resolve_compile("false", cuda)
    assert parse_train_args(["--data_path", "x", "--compile", "True"]).compile == "true"  # YAML's booleans too
    with pytest.raises(SystemExit):
        parse_train_args(["--data_path", "x", "--augmentation", "fast"])


# ------------------------------------------------------------------------------------------------------ data
def expected_crops(root: str, cfg: dict, epoch: int, iteration: int, rank: int = 0) -> list[torch.Tensor]:
    """The spec, from independent parts: the shuffled order of torch's DistributedSampler, PIL decoding, and the
    recipe's BatchedMultiCrop drawing from a generator seeded by SeedSequence(seed, epoch, iteration, rank)."""
    files = ImageFolder(root).samples
    sampler = DistributedSampler(files, num_replicas=1, rank=0, shuffle=True, seed=cfg["seed"])
    sampler.set_epoch(epoch)
    batch = cfg["batch_size_per_gpu"]
    indices = list(sampler)[iteration * batch:(iteration + 1) * batch]
    images = [pil_to_tensor(Image.open(files[i][0]).convert("RGB")) for i in indices]
    words = np.random.SeedSequence([cfg["seed"], epoch, iteration, rank]).generate_state(2)
    generator = torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))
    recipe = BatchedMultiCrop(global_crops_scale=cfg["global_crops_scale"], local_crops_scale=cfg["local_crops_scale"],
                              local_crops_number=cfg["local_crops_number"], global_crop_size=cfg["global_crop_size"],
                              local_crop_size=cfg["local_crop_size"])
    return recipe(images, generator=generator)


@pytest.mark.parametrize("workers", [0, 2])
def test_device_crops_are_the_recipe_on_the_sampled_images_seeded_by_position(images, workers) -> None:
    """Epoch 1 started at iteration 2 (a mid-epoch resume): each batch's crops equal the spec exactly."""
    cfg = config(images, *BATCHED, "--num_workers", str(workers))
    data = TrainingData(cfg, rank=0, world_size=1, device=torch.device("cpu"))
    assert data.pipeline == "batched"
    data.start_epoch(1, 2)
    seen = []
    for iteration, batch in enumerate(data.loader, start=2):
        crops = data.crops(batch, 1, iteration)
        assert [tuple(c.shape) for c in crops] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2
        for ours, spec in zip(crops, expected_crops(images, cfg, 1, iteration)):
            assert torch.equal(ours, spec)
        seen.append(iteration)
    assert seen == [2, 3]


def test_packed_batch_gives_the_crops_of_fully_padded_images() -> None:
    """pack_images keeps PIL's channels-last layout and repeats only the first padding row and column (all the
    resampling reads beyond an edge): its batch, channels first, gives the crops of pad_images' full padding."""
    g = torch.Generator().manual_seed(0)
    batch = [torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)
             for h, w in [(20, 31), (37, 12), (37, 31)]]
    packed, sizes = pack_images(batch)
    padded, padded_sizes = pad_images([image.permute(2, 0, 1) for image in batch])
    channels_first = packed.permute(0, 3, 1, 2)
    assert torch.equal(sizes, padded_sizes) and channels_first.shape == padded.shape
    assert torch.equal(channels_first[:, :, :20, :12], padded[:, :, :20, :12])
    assert torch.equal(channels_first[0, :, 20, :31], padded[0, :, 20, :31]) and packed[0, 21:].eq(0).all()
    aug = BatchedMultiCrop(local_crops_number=3, global_crop_size=16, local_crop_size=8, global_crops_scale=(0.05, 1))
    ours = aug(channels_first, sizes, generator=torch.Generator().manual_seed(1))
    reference = aug(padded, sizes, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(ours, reference))


def test_large_jpegs_are_decoded_reduced_but_never_below_what_the_crops_need(tmp_path) -> None:
    cfg = {"global_crop_size": 224, "local_crop_size": 96, "global_crops_scale": (0.4, 1.0),
           "local_crops_scale": (0.05, 0.4), "local_crops_number": 8}
    need = min_decode_area(cfg)
    assert need == math.ceil(96 * 96 / 0.05)  # the smallest local crop's source covers 96 x 96 px
    yy, xx = np.mgrid[0:1200, 0:1000]
    pixels = np.stack([128 + 100 * np.sin(xx / 40), 128 + 100 * np.cos(yy / 30), 0 * xx + 90], -1).astype(np.uint8)
    large, small, png = tmp_path / "large.jpg", tmp_path / "small.jpg", tmp_path / "large.png"
    Image.fromarray(pixels).save(large, quality=95)
    Image.fromarray(pixels[:500, :400]).save(small, quality=95)
    Image.fromarray(pixels).save(png)
    reduced = load_rgb_image_reduced(str(large), need)
    assert reduced.size == (500, 600) and 500 * 600 >= need  # DCT scale 1/2: 1/4 would give 250 x 300 < need
    full = Image.open(large).convert("RGB").resize(reduced.size, Image.BILINEAR)
    assert np.abs(np.asarray(reduced, dtype=float) - np.asarray(full, dtype=float)).mean() < 3  # uint8 levels
    for path in (small, png):  # below the threshold, or not a JPEG: decoded exactly as the reference pipeline does
        assert np.array_equal(np.asarray(load_rgb_image_reduced(str(path), need)),
                              np.asarray(Image.open(path).convert("RGB")))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(BadImageError, match="bad.jpg"):
        load_rgb_image_reduced(str(bad), need)


def test_both_pipelines_feed_the_same_images_in_order_with_the_same_crop_statistics(tmp_path) -> None:
    """Same sampler order: each sample's mean colour over its crops correlates across the pipelines (other crops and
    jitter, the same source image; measured 0.83, and 0.03 with the samples shuffled); per view, each channel's
    mean agrees within 4 standard errors and the pixel spread within 10% (bicubic PIL vs bilinear roi_align)."""
    root = make_image_folder(tmp_path / "data", num_classes=6, per_class=8, size=48)
    crops = {}
    for pipeline in ("per_image", "batched"):
        data = TrainingData(config(root, "--augmentation", pipeline, "--batch_size_per_gpu", "8"), 0, 1,
                            torch.device("cpu"))
        batches = []
        for epoch in range(3):
            data.start_epoch(epoch, 0)
            batches += [data.crops(batch, epoch, iteration) for iteration, batch in enumerate(data.loader)]
        crops[pipeline] = [torch.cat([views[view] for views in batches]) for view in range(4)]
    colours = {p: torch.stack([view.mean(dim=(2, 3)) for view in crops[p]]) for p in crops}  # (views, samples, 3)
    per_sample = torch.stack([colours["per_image"].mean(0).flatten(), colours["batched"].mean(0).flatten()])
    assert torch.corrcoef(per_sample)[0, 1] > 0.6
    for view in range(4):
        per_image, batched = colours["per_image"][view], colours["batched"][view]
        assert per_image.shape == batched.shape == (144, 3)
        standard_error = torch.sqrt((per_image.var(0) + batched.var(0)) / len(per_image))
        assert ((per_image.mean(0) - batched.mean(0)).abs() <= 4 * standard_error).all(), view
        spread = crops["per_image"][view].std()
        assert abs(spread - crops["batched"][view].std()) / spread < 0.1, view


# -------------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def straight_batched_run(images, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("straight_batched"))
    assert run(images, out, "--epochs", "2", *BATCHED).code == 0
    return out


def test_batched_augmentation_resumes_exactly_mid_epoch_with_another_worker_count(images, straight_batched_run,
                                                                                 tmp_path, monkeypatch,
                                                                                 capsys) -> None:
    """As test_train's stop test, with --augmentation batched: stopped after (1, 1), saved at (1, 2); the rerun (2
    workers instead of 0) runs the rest only and ends bit-identical to the uninterrupted run."""
    stop = StopRequest()
    step = DinoTrainer.train_step

    def step_then_request(self, crops, epoch, global_iteration):
        metrics = step(self, crops, epoch, global_iteration)
        if (epoch, self.iteration) == (1, 1):
            stop.request("test")
        return metrics

    monkeypatch.setattr(DinoTrainer, "train_step", step_then_request)
    out = str(tmp_path / "run")
    argv = [*TINY, "--data_path", images, "--output_dir", out, "--epochs", "2", *BATCHED, *EVERY_STEP]
    assert main_dino.main(argv, stop=stop) == 75
    assert executed_steps(capsys.readouterr().out) == steps_between((0, 0), (1, 2))
    monkeypatch.undo()
    assert main_dino.main([*argv, "--num_workers", "2"]) == 0
    assert executed_steps(capsys.readouterr().out) == steps_between((1, 2), (2, 0))
    assert logged_epochs(out) == [0, 1]
    assert_same_training_state(straight_batched_run, out)
    provenance = [json.loads(line) for line in open(os.path.join(out, "provenance.jsonl"))]
    assert {(p["augmentation"], p["compiled"]) for p in provenance} == {("batched", False)}


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR), reason="needs Debian's dataset-fashion-mnist")
def test_batched_and_per_image_pipelines_train_alike_within_the_spread_of_seeds(tmp_path, capsys) -> None:
    """benchmarks/agreement.py at a tiny size: 3 seeds x 2 pipelines, 4 steps of TINY on 64 Fashion-MNIST images at
    a learning rate that moves the weights (the k-NN on 200 test images leaves its random-init value; at 0.01 it
    does not), 80 s on 2 busy cores. Every logged loss and the final k-NN agree within 3 standard errors of the
    difference (from the seeds' spread), which the test prints (docs/performance.md)."""
    data = write_fashion_mnist_subset(FASHION_MNIST_DIR, str(tmp_path / "fmnist"), 64, 200)
    train_argv = [*TINY, "--dataset", "fashion_mnist", "--data_path", data, "--batch_size_per_gpu", "16",
                  "--epochs", "1", "--warmup_epochs", "0", "--lr", "0.05", "--knn_every", "1", "--knn_subset", "200"]
    runs = agreement.train_runs(train_argv, range(3), str(tmp_path / "runs"))
    assert runs["per_image"].losses.shape == runs["batched"].losses.shape == (3, 4)
    assert (runs["per_image"].knn != runs["per_image"].knn_init).any()  # training changed the encoding
    with capsys.disabled():
        print("\n" + "\n".join(f"{row.setting} | {row.metric}: {row.value}" for row in agreement.summary(runs)))
    assert agreement.agree(runs, knn_resolution=100 / 200)
    batched = runs["batched"]
    broken = {**runs, "batched": agreement.PipelineRuns(batched.losses + 0.3, batched.knn, batched.knn_init)}
    assert not agreement.agree(broken)  # a shift of the loss curve by 0.3 is outside the spread


# ------------------------------------------------------------------------------------------------------ step
def test_fused_adamw_step_equals_the_foreach_step(images) -> None:
    """TrainingStep with the fused AdamW the trainer uses by default (on GPUs and CPUs) moves student and teacher
    as the default foreach AdamW does: update vectors equal up to float rounding (measured 4e-6 relative; a fused
    step that skipped the scheduled weight decay would differ by ~1e-3)."""
    from sparo_dino.model.networks import build_student_teacher
    from sparo_dino.train.loss import DINOLoss

    cfg = config(images, "--drop_path_rate", "0")
    crops = [torch.randn(4, 3, s, s, generator=torch.Generator().manual_seed(i))
             for i, s in enumerate([32, 32, 16, 16])]
    updates = []
    for fused in (False, True):
        torch.manual_seed(0)
        student, teacher = build_student_teacher(cfg)

        def flat() -> torch.Tensor:
            return torch.cat([p.detach().flatten() for p in (*student.parameters(), *teacher.parameters())])

        start = flat().clone()
        optimizer = build_optimizer("adamw", param_groups(student), fused=fused)
        assert optimizer.defaults["fused"] is (True if fused else None)
        step = TrainingStep(student, student, teacher, DINOLoss(64, 4, 0.04, 0.04, 0, 2), optimizer, "fp32",
                            torch.device("cpu"), clip_grad=3.0, freeze_last_layer=0)
        for _ in range(2):
            step(crops, epoch=1, lr=1e-3, weight_decay=0.04, momentum=0.9)
        updates.append(flat() - start)
    foreach, fused_update = updates
    assert foreach.abs().max() > 1e-4  # the step really moved the networks
    assert (fused_update - foreach).norm() / foreach.norm() < 1e-4


def test_trainer_fuses_adamw_by_default_and_the_reference_flag_keeps_foreach(images, tmp_path) -> None:
    """The fused kernel is the default on CPUs too (faster there as well, docs/performance.md); --fused_adamw
    false is the reference path the test above compares it with."""
    for flags, fused in (((), True), (("--fused_adamw", "false"), None)):
        args = parse_train_args([*TINY, "--data_path", images, "--output_dir", str(tmp_path / "run"), *flags])
        trainer = DinoTrainer(RunConfig.from_flags(args), DistInfo(0, 1, 0, torch.device("cpu")), stop=StopRequest())
        assert trainer.optimizer.defaults["fused"] is fused


# Ops whose result the host must read from the device (on a GPU: a synchronisation). `.tolist()`, `.numpy()` and
# printing read memory without dispatching an op, so they are not seen here.
HOST_READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.is_nonzero.default",
              "aten.equal.default", "aten.allclose.default", "aten.masked_select.default", "aten._unique2.default",
              "aten.unique_consecutive.default", "aten.repeat_interleave.Tensor", "aten.bincount.default"}


class DeviceReads(TorchDispatchMode):
    """On the CPU, treats the given tensors, and every tensor computed from them, as device tensors, and records
    each op that would make the host read one of them, with the names of the Python functions it was called from."""

    def __init__(self, device_tensors) -> None:
        super().__init__()
        self.device: set[int] = set()
        self.reads: list[tuple[str, list[str]]] = []
        for tensor in device_tensors:
            self.mark(tensor)

    def mark(self, tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in self.device:
            self.device.add(id(tensor))
            weakref.finalize(tensor, self.device.discard, id(tensor))
        return tensor

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        on_device = any(id(t) in self.device for t in inputs)
        if on_device and str(func) in HOST_READS:
            self.reads.append((str(func), [frame.name for frame in traceback.extract_stack()]))
        out = func(*args, **(kwargs or {}))
        if on_device:
            for tensor in torch.utils._pytree.tree_leaves(out):
                if isinstance(tensor, torch.Tensor):
                    self.mark(tensor)
        return out


def test_an_epoch_reads_nothing_from_the_device_between_logging_intervals(images, tmp_path, monkeypatch) -> None:
    """An epoch of the fast path (device crops, a stop request wired; fp32, as bf16 autocast is 4x slower on CPUs and
    changes no host read) with --print_freq 3 over 4 iterations: no op in crops, step or stop poll reads a device
    value on the host; the metrics are read (by .tolist(), which this mode cannot see) at the logging boundaries
    only: step 3's line, the epoch end's line and the epoch's means. The mode does see a read, so a sync added to
    the step fails this test."""
    args = parse_train_args([*TINY, "--data_path", images, "--output_dir", str(tmp_path / "run"), "--epochs", "1",
                             *BATCHED, "--print_freq", "3"])
    trainer = DinoTrainer(RunConfig.from_flags(args), DistInfo(0, 1, 0, torch.device("cpu")), stop=StopRequest())
    device_crops, global_means = DeviceMultiCrop.__call__, MetricSums.global_means
    metric_reads = []

    def crops_from_device_pixels(self, pixels, sizes, epoch, iteration):
        return device_crops(self, mode.mark(pixels), sizes, epoch, iteration)  # the batch as it reaches the device

    def counted_global_means(self):
        metric_reads.append(trainer.iteration)
        return global_means(self)

    monkeypatch.setattr(DeviceMultiCrop, "__call__", crops_from_device_pixels)
    monkeypatch.setattr(MetricSums, "global_means", counted_global_means)
    state = [*trainer.student_module.parameters(), *trainer.student_module.buffers(), *trainer.teacher.parameters(),
             *trainer.teacher.buffers(), *trainer.dino_loss.buffers()]
    with DeviceReads(state) as mode:
        trainer.train_one_epoch(0)
        reads_in_epoch = list(mode.reads)
        bool(trainer.dino_loss.center.sum() > 0)  # a deliberate read
    assert trainer.iteration == 4 and metric_reads == [3, 4, 4]
    assert reads_in_epoch == []
    assert [op for op, _ in mode.reads] == ["aten.is_nonzero.default"] or \
        [op for op, _ in mode.reads] == ["aten._local_scalar_dense.default"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (the CPU proof is the test above)")
def test_on_a_gpu_crops_and_step_make_the_host_wait_for_nothing(images, tmp_path) -> None:
    """With CUDA's sync debug mode set to error, a step of the default GPU path (device crops, bf16, fused AdamW;
    eager, so that compilation does not count) raises on any blocking copy or device read."""
    args = parse_train_args([*TINY, "--data_path", images, "--output_dir", str(tmp_path / "run"), "--epochs", "1",
                             "--compile", "false"])
    device = torch.device("cuda", torch.cuda.current_device())
    trainer = DinoTrainer(RunConfig.from_flags(args), DistInfo(0, 1, 0, device))
    assert trainer.data.pipeline == "batched" and trainer.precision == "bf16" and trainer.optimizer.defaults["fused"]
    trainer.data.start_epoch(0, 0)
    for iteration, batch in enumerate(trainer.data.loader):
        if iteration > 0:  # the first step allocates and initialises lazily
            torch.cuda.set_sync_debug_mode("error")
        try:
            trainer.train_step(trainer.data.crops(batch, 0, iteration), 0, iteration)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert iteration == 3


# ------------------------------------------------------------------------------------------------------ stop
# Two gloo processes that import nothing but torch and the stop logic (spawning the test module would import the
# whole trainer twice): rank 1 alone is asked to stop during step 3; each prints its answers at boundaries 1-6.
POLL_SCRIPT = """
import sys, torch, torch.distributed as dist
from sparo_dino.train.preemption import StopPoll, StopRequest
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
for asynchronous in (False, True):
    stop = StopRequest()
    poll = StopPoll(stop, torch.device("cpu"), asynchronous=asynchronous)
    answers = []
    for step in range(1, 7):
        if rank == 1 and step == 3:
            stop.request("test")
        answers.append(int(poll.poll()))
    poll.reset()
    print(asynchronous, answers, stop.reason, flush=True)
dist.destroy_process_group()
"""


def test_stop_poll_gives_every_rank_the_same_boundary(tmp_path, spawn) -> None:
    """Rank 1 alone is asked during step 3: both ranks see the stop at the same boundary, after step 3 when polled
    synchronously (CPUs), after step 4 with the asynchronous poll of GPU runs (it reads the all-reduce launched at
    the previous boundary), and never before."""
    script = tmp_path / "poll.py"
    script.write_text(POLL_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    ranks = [spawn([sys.executable, str(script), str(rank), str(tmp_path / "init")], env=env) for rank in (0, 1)]
    assert [rank.wait_exit(timeout=120) for rank in ranks] == [0, 0], [rank.text for rank in ranks]
    reasons = {0: "another rank was asked to stop", 1: "test"}
    for rank, output in enumerate(ranks):
        assert output.text.splitlines() == [f"False [0, 0, 1, 1, 1, 1] {reasons[rank]}",
                                            f"True [0, 0, 0, 1, 1, 1] {reasons[rank]}"], output.text


def test_each_rank_draws_its_own_crops_and_each_position_its_own() -> None:
    """The crop generator is seeded by (seed, epoch, iteration, rank): the same batch gets other crops on another
    rank or at another position (ranks must not augment alike), and the same crops again at the same position."""
    g = torch.Generator().manual_seed(0)
    packed, sizes = pack_images([torch.randint(0, 256, (28, 28, 3), generator=g, dtype=torch.uint8)
                                 for _ in range(4)])
    cfg = {"global_crop_size": 16, "local_crop_size": 8, "global_crops_scale": (0.4, 1.0),
           "local_crops_scale": (0.05, 0.4), "local_crops_number": 2}
    rank0, rank1 = (DeviceMultiCrop(cfg, seed=0, rank=rank, device=torch.device("cpu")) for rank in (0, 1))
    reference = rank0(packed, sizes, epoch=1, iteration=3)
    assert all(torch.equal(a, b) for a, b in zip(reference, rank0(packed, sizes, epoch=1, iteration=3)))
    for other in (rank1(packed, sizes, epoch=1, iteration=3), rank0(packed, sizes, epoch=1, iteration=4),
                  rank0(packed, sizes, epoch=2, iteration=3)):
        assert not torch.equal(reference[0], other[0])
