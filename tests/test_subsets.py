"""One seeded draw of a fixed random subset, shared by the k-NN monitor's subset, the slot-selection hold-out and
eval_linear's learning-rate hold-out: each is the same function of (size, count, seed)."""
from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from sparo_dino.eval import knn
from sparo_dino.eval.subsets import seeded_split
from sparo_dino.train import knn_monitor


def test_a_seeded_split_is_a_sorted_partition_that_depends_on_the_seed_only() -> None:
    chosen, rest = seeded_split(100, 30, seed=5)
    assert chosen.shape == (30,) and rest.shape == (70,)
    assert torch.equal(torch.cat([chosen, rest]).sort().values, torch.arange(100))
    assert torch.equal(chosen, chosen.sort().values) and torch.equal(rest, rest.sort().values)
    torch.manual_seed(123)  # the global stream plays no part
    again, _ = seeded_split(100, 30, seed=5)
    assert torch.equal(chosen, again)
    assert not torch.equal(chosen, seeded_split(100, 30, seed=6)[0])
    assert not torch.equal(chosen, torch.arange(30))  # not a prefix: ImageFolders are sorted by class


def test_the_monitor_subset_and_the_slot_holdout_draw_the_same_split() -> None:
    dataset = TensorDataset(torch.arange(50))
    subset = knn_monitor._fixed_subset(dataset, 10, seed=3)
    fit, holdout = knn.holdout_split(50, 0.2, seed=3)
    chosen, rest = seeded_split(50, 10, seed=3)
    assert subset.indices == chosen.tolist() and torch.equal(holdout, chosen) and torch.equal(fit, rest)
    assert knn_monitor._fixed_subset(dataset, 50, seed=3) is dataset  # small enough: all of it
