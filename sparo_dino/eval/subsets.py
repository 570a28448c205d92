"""The fixed random subsets that evaluation draws: the k-NN monitor's images, and the hold-outs that choose SPARO
slots and the linear probe's learning rate."""
from __future__ import annotations

import torch


def seeded_split(num_samples: int, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(`count` indices drawn at random, the other indices), each sorted.

    Drawn from a generator seeded by `seed` alone, so every process and every rerun draws the same split whatever
    the global random state; drawn rather than taken as a prefix because an ImageFolder is sorted by class, and its
    first `count` samples would miss classes."""
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    return order[:count].sort().values, order[count:].sort().values
