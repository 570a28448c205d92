"""Evaluation memory at ImageNet scale, checked on CPU: what extraction leaves behind is released before the search."""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import weakref

import pytest
import torch
import torch.multiprocessing as mp
from test_eval_knn import REPO, SMALL_IMAGES, write_checkpoint
from test_features import SPARO_TINY, _free_port
from test_knn import brute_force_scores, random_problem

from sparo_dino import distributed
from sparo_dino.cli import eval_flags
from sparo_dino.eval import knn
from sparo_dino.io import weights


def test_cached_device_memory_is_released_once_the_backbone_is_gone(image_folder, tmp_path, monkeypatch):
    """torch's CUDA cache keeps the extraction's activation blocks; they go back (empty_cache) after the backbone
    is dropped, so the k-NN bank and faiss-gpu, which allocates outside torch's cache, can have them."""
    import eval_knn

    backbones, alive_at_release = [], []
    real_load_backbone = weights.load_backbone

    def spied_load_backbone(*args, **kwargs):
        backbone, options, tag = real_load_backbone(*args, **kwargs)
        backbones.append(weakref.ref(backbone))
        return backbone, options, tag

    def spied_empty_cache():
        gc.collect()
        alive_at_release.append(backbones[-1]() is not None)

    monkeypatch.setattr(weights, "load_backbone", spied_load_backbone)
    monkeypatch.setattr(torch.cuda, "empty_cache", spied_empty_cache)
    checkpoint = write_checkpoint(tmp_path / "run", SPARO_TINY)
    args = eval_knn.build_parser().parse_args(["--pretrained_weights", checkpoint, "--data_path", image_folder,
                                               *SMALL_IMAGES])
    data = eval_flags.compute_features(args, torch.device("cpu"))
    assert data is not None and len(data.train_features) == 24
    assert alive_at_release == [False]


def _sharded_worker(rank: int, world: int, port: int, num_train: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = distributed.init_distributed("gloo")
    knn._BANK_CHUNK_ROWS = 4  # bank-chunk merges inside each rank too
    try:
        train, labels, test = random_problem(num_train=num_train)
        shard = slice(rank, None, world)  # ShardSampler's split: uneven, and empty on rank 1 with one train row
        scores = knn.sharded_knn_scores(train[shard], labels[shard], test, 4, [1, 5, 20], backend="torch",
                                        collective_device=info.device)
        torch.save(scores, f"{out}.{rank}")
    finally:
        distributed.cleanup()


@pytest.mark.parametrize("num_train", [61, 1])
def test_bank_sharded_over_two_ranks_gives_the_unsharded_scores(tmp_path, num_train):
    out = str(tmp_path / "scores")
    mp.spawn(_sharded_worker, args=(2, _free_port(), num_train, out), nprocs=2, join=True)
    train, labels, test = random_problem(num_train=num_train)
    for rank in range(2):  # every rank gets the scores
        scores = torch.load(f"{out}.{rank}")
        for k in (1, 5, 20):
            torch.testing.assert_close(scores[k].double(), brute_force_scores(train, labels, test, 4, k, 0.07),
                                       rtol=1e-4, atol=1e-6)


def test_eval_knn_shard_bank_on_two_ranks_reports_the_single_process_result(image_folder, tmp_path):
    """torchrun with 2 gloo ranks and --shard_bank: each rank extracts and searches its half of train, rank 0 writes
    the same accuracies as one process holding the whole bank (an odd train count: 24 images, shards of 12)."""
    import eval_knn

    checkpoint = write_checkpoint(tmp_path / "run", SPARO_TINY)
    flags = ["--pretrained_weights", checkpoint, "--data_path", image_folder, *SMALL_IMAGES, "--nb_knn", "5", "20",
             "--knn_backend", "torch"]
    alone = eval_knn.main([*flags, "--output_dir", str(tmp_path / "alone")])
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
         "eval_knn.py", *flags, "--shard_bank", "true", "--output_dir", str(tmp_path / "sharded")],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    sharded = json.loads((tmp_path / "sharded" / "knn_checkpoint_teacher.json").read_text())
    assert sharded["meta"]["train_shard"] == {"rank": 0, "world_size": 2, "num_train": 24}
    assert sharded["num_train"] == alone["num_train"] == 24
    for k, accuracy in alone["knn"].items():
        assert sharded["knn"][k] == pytest.approx(accuracy), k
    with pytest.raises(ValueError, match="--shard_bank keeps the train features split over the ranks"):
        eval_knn.main([*flags, "--shard_bank", "true", "--per_slot"])
