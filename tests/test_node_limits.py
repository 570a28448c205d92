"""A GPU node shared by the job's ranks: Inductor's compile workers are bounded per rank, and a /dev/shm too small
for the loader workers' prefetched batches is one line at start-up (here with a faked size)."""
from __future__ import annotations

import os

import pytest
import torch
from conftest import make_image_folder
from PIL import Image
from test_compile import pooled_step
from test_train import TINY

import main_dino
from sparo_dino import node_limits
from sparo_dino.cli.train_flags import parse_train_args
from sparo_dino.data.loader import TrainingData, loader_batch_bytes

MB = 2**20
# official recipe, 64 per GPU with 2 x 224 + 10 x 96 crops, float32: what a per_image worker sends per batch
OFFICIAL_BATCH = 64 * 3 * 4 * (2 * 224 * 224 + 10 * 96 * 96)


@pytest.fixture
def no_user_setting(monkeypatch):
    """No TORCHINDUCTOR_COMPILE_THREADS from the user; whatever the test sets is undone afterwards."""
    monkeypatch.setenv(node_limits.COMPILE_THREADS_VARIABLE, "placeholder")
    monkeypatch.delenv(node_limits.COMPILE_THREADS_VARIABLE)


@pytest.fixture
def eight_ranks_on_64_cpus(monkeypatch) -> None:
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)


@pytest.mark.parametrize("ranks, usable, node, threads", [
    (8, 128, 128, 16),  # unbound ranks share the node
    (8, 11, 128, 11),  # SLURM bound each task to its 11 CPUs
    (1, 64, 64, 32),  # alone: Inductor's own cap
    (16, 8, 8, 1),  # never 0
])
def test_compile_threads_are_a_share_of_the_node(ranks, usable, node, threads) -> None:
    assert node_limits.compile_threads_per_rank(ranks, usable, node) == threads


def test_a_compiled_step_bounds_inductors_workers_before_compiling(no_user_setting, eight_ranks_on_64_cpus,
                                                                   monkeypatch) -> None:
    """8 ranks on 64 CPUs: 8 compile workers each (Inductor alone would start 32 per rank), in the variable and in
    Inductor's config, which read the variable when it was imported."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "compile_threads", inductor_config.compile_threads)
    pooled_step(compile_backend="aot_eager")
    assert os.environ[node_limits.COMPILE_THREADS_VARIABLE] == "8"
    assert inductor_config.compile_threads == 8


def test_the_users_compile_threads_are_kept(eight_ranks_on_64_cpus, monkeypatch) -> None:
    monkeypatch.setenv(node_limits.COMPILE_THREADS_VARIABLE, "3")
    pooled_step(compile_backend="aot_eager")
    assert os.environ[node_limits.COMPILE_THREADS_VARIABLE] == "3"


def test_an_eager_step_leaves_compile_threads_alone(no_user_setting, eight_ranks_on_64_cpus) -> None:
    pooled_step()
    assert node_limits.COMPILE_THREADS_VARIABLE not in os.environ


# ------------------------------------------------------------------------------------------------- /dev/shm
def test_a_per_image_batch_is_the_recipes_float_crops() -> None:
    config = vars(parse_train_args(["--local_crops_number", "10", "--data_path", "/d"]))
    assert loader_batch_bytes(config, "per_image", None) == OFFICIAL_BATCH  # 141 MB


def test_prefetched_batches_that_fit_say_nothing() -> None:
    assert node_limits.check_shm(OFFICIAL_BATCH, 10, 2, 8, 32 * 2**30) is None  # 22 GB of 32 GB
    assert node_limits.check_shm(OFFICIAL_BATCH, 0, 0, 8, 64 * MB) is None  # no workers, no shared memory
    assert node_limits.check_shm(OFFICIAL_BATCH, 10, 2, 8, None) is None  # no /dev/shm to ask


def test_too_little_shm_for_all_workers_names_the_need_and_the_workers_that_fit() -> None:
    line = node_limits.check_shm(OFFICIAL_BATCH, 10, 2, 1, 2**30)
    assert "\n" not in line and line.startswith("warning: /dev/shm has 1.0 GB free")
    assert "need 2.8 GB" in line  # 10 x 2 x 141 MB
    assert f"--num_workers {2**30 // (2 * OFFICIAL_BATCH)} (fits)" in line  # 3


def test_shm_that_holds_not_one_workers_batches_is_an_error() -> None:
    """A container's default 64 MB under 8 ranks: not even one batch of 141 MB fits."""
    with pytest.raises(ValueError) as error:
        node_limits.check_shm(OFFICIAL_BATCH, 10, 2, 8, 64 * MB)
    message = str(error.value)
    assert "\n" not in message and message.startswith("/dev/shm has 64.0 MB free but 10 loader workers x 2 "
                                                      "prefetched batches of 141.0 MB x 8 ranks on this node "
                                                      "need 22.0 GB")
    assert "--num_workers 0" in message and "--shm-size=23g" in message


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    return make_image_folder(tmp_path_factory.mktemp("data"), num_classes=2, per_class=8, size=32)


def fake_shm(monkeypatch, free_bytes: int) -> None:
    monkeypatch.setattr(node_limits, "shm_free_bytes", lambda path=node_limits.SHM_PATH: free_bytes)


def test_training_data_warns_at_start_up_with_a_faked_shm(images, tmp_path, monkeypatch, capsys) -> None:
    """TINY per_image: 4 x (2 x 32^2 + 2 x 16^2) x 3 float32 = 120 KB a batch, 2 prefetched per worker."""
    batch = 4 * (2 * 32 * 32 + 2 * 16 * 16) * 3 * 4
    fake_shm(monkeypatch, 2 * batch + 1)
    config = vars(parse_train_args([*TINY, "--num_workers", "2", "--data_path", images,
                                    "--output_dir", str(tmp_path)]))
    TrainingData(config, 0, 1, torch.device("cpu")).close()
    assert capsys.readouterr().out.splitlines()[-1] == (
        "warning: /dev/shm has 240.0 KB free but 2 loader workers x 2 prefetched batches of 120.0 KB need 480.0 KB; "
        "the workers may die with a bus error: use --num_workers 1 (fits) or a larger /dev/shm")


def test_the_batched_estimate_is_the_packed_uint8_batch_the_workers_send(tmp_path) -> None:
    """A 640 x 480 and a 480 x 640 JPEG: the TINY recipe keeps >= 5120 pixels, so both decode at 1/4 scale (1/8
    would leave 80 x 60 < the 83 x 62 asked for) and pack into one 160 x 160 batch, read from the headers alone."""
    root = tmp_path / "data"
    for name, size in (("wide", (640, 480)), ("tall", (480, 640))):
        (root / name).mkdir(parents=True)
        Image.new("RGB", size, (200, 30, 30)).save(root / name / "image.jpg", quality=90)
    config = vars(parse_train_args([*TINY, "--augmentation", "batched", "--batch_size_per_gpu", "2",
                                    "--data_path", str(root), "--output_dir", str(tmp_path / "out")]))
    data = TrainingData(config, 0, 1, torch.device("cpu"))
    data.start_epoch(0, 0)
    pixels = next(iter(data.loader))[0]
    assert pixels.dtype == torch.uint8 and tuple(pixels.shape) == (2, 160, 160, 3)
    assert loader_batch_bytes(config, "batched", data.dataset) == pixels.numel() == 2 * 160 * 160 * 3
    data.close()


def test_a_run_whose_workers_cannot_fit_ends_with_one_line(images, tmp_path, monkeypatch, capsys) -> None:
    fake_shm(monkeypatch, 64 * 1024)
    code = main_dino.main([*TINY, "--num_workers", "2", "--data_path", images, "--output_dir", str(tmp_path)])
    error = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in error, error
    assert error.startswith("error: /dev/shm has 64.0 KB free but 2 loader workers x 2 prefetched batches of "
                            "120.0 KB need 480.0 KB") and "--num_workers 0" in error
