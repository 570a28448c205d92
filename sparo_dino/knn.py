"""Weighted k-nearest-neighbour classification on frozen encodings (the DINO k-NN protocol) and SPARO slot analysis.

DINO's k-NN score is the cosine top-k of L2-normalized features with votes exp(sim / T) (T = 0.07). One exact
search with the largest k serves every k, because the top-k of a sorted top-k_max are its first k columns.
faiss (IndexFlatIP, exact) does the search when installed, a chunked torch matmul is the reference and the fallback.
`device` says where the search runs (eval_knn's official --use_cuda): the torch backend moves the features there,
faiss uses a GPU index only when allowed and it has a GPU. Features are L2-normalized here, so already normalized
ones (an official DINO dump) give the same neighbours. SPARO encodings are L2-normalized as a whole (not per slot);
per-slot analysis views the encoding as (num_slots, slot_dim) and scores each slot alone, and slot selection ranks
slots on a held-out part of the TRAIN set only, so the test set never influences which slots are kept (paper
Sec. 5.1, adapted).
"""
from __future__ import annotations

import functools
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "faiss", "torch")
# Elements of one (test chunk x train) similarity block in the torch backend: 2**27 fp32 = 512 MiB.
_TORCH_BLOCK_ELEMENTS = 2 ** 27

try:
    import faiss
except ImportError:  # faiss is an optional extra (faiss-cpu or faiss-gpu)
    faiss = None


def resolve_backend(backend: str = "auto") -> str:
    """Turn "auto" into faiss when it is installed, torch otherwise (with a warning, since faiss is expected)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown k-NN backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend == "faiss" and faiss is None:
        raise ValueError("k-NN backend faiss requested but faiss is not installed (pip install faiss-cpu or faiss-gpu)")
    if backend == "auto":
        if faiss is None:
            warnings.warn("faiss is not installed; k-NN falls back to the exact torch backend (slower on large sets)")
            return "torch"
        return "faiss"
    return backend


@functools.lru_cache(maxsize=1)
def _faiss_gpu_resources():
    """One set of GPU scratch memory for all searches (per-slot analysis runs one search per slot)."""
    return faiss.StandardGpuResources()


def _faiss_search(train: torch.Tensor, test: torch.Tensor, k: int, use_gpu: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    train_np = train.detach().to("cpu", torch.float32).contiguous().numpy()
    test_np = test.detach().to("cpu", torch.float32).contiguous().numpy()
    dim = train_np.shape[1]
    if use_gpu and getattr(faiss, "get_num_gpus", lambda: 0)() > 0:
        index = faiss.GpuIndexFlatIP(_faiss_gpu_resources(), dim)
    else:
        index = faiss.IndexFlatIP(dim)
    index.add(train_np)
    sims, idx = index.search(test_np, k)
    return torch.from_numpy(sims), torch.from_numpy(idx).long()


def _torch_search(train: torch.Tensor, test: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    test = test.to(train.device)
    chunk = max(1, _TORCH_BLOCK_ELEMENTS // max(1, train.shape[0]))
    sims, idx = [], []
    for start in range(0, test.shape[0], chunk):
        block = test[start:start + chunk] @ train.T
        top_sims, top_idx = block.topk(k, dim=1, largest=True, sorted=True)
        sims.append(top_sims.cpu())
        idx.append(top_idx.cpu())
    if not sims:
        return torch.empty(0, k), torch.empty(0, k, dtype=torch.long)
    return torch.cat(sims), torch.cat(idx)


def search_topk(train_features: torch.Tensor, test_features: torch.Tensor, k: int,
                backend: str = "auto", device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact cosine top-k: L2-normalize both sets, return (similarities, train indices), each (num_test, k') on CPU,
    sorted by decreasing similarity, with k' = min(k, num_train).

    `device`: where the search runs. None keeps the torch backend on the train features' device and lets faiss use a
    GPU whenever it has one; a CPU device keeps faiss on the CPU too (the bank may not fit in GPU memory)."""
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise ValueError("k-NN features must be 2-D (num_samples, dim), got "
                         f"{tuple(train_features.shape)} and {tuple(test_features.shape)}")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"train features have dim {train_features.shape[1]} but test features have dim "
                         f"{test_features.shape[1]}")
    if train_features.shape[0] == 0:
        raise ValueError("k-NN needs at least one train sample")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, train_features.shape[0])
    backend = resolve_backend(backend)
    if backend == "torch" and device is not None:
        train_features, test_features = train_features.to(device), test_features.to(device)
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    if backend == "faiss" and test.shape[0] > 0:
        return _faiss_search(train, test, k, use_gpu=device is None or torch.device(device).type == "cuda")
    return _torch_search(train, test, k)


def vote(similarities: torch.Tensor, neighbor_labels: torch.Tensor, num_classes: int,
         temperature: float = 0.07) -> torch.Tensor:
    """Sum exp(sim / T) of the neighbours per class: (num_test, num_classes) raw scores, as official DINO."""
    weights = (similarities.float() / temperature).exp()
    scores = torch.zeros(similarities.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
    return scores.scatter_add_(1, neighbor_labels.long(), weights)


def _check_labels(labels: torch.Tensor, num_features: int, num_classes: int) -> torch.Tensor:
    labels = torch.as_tensor(labels).long().cpu()
    if labels.ndim != 1 or labels.shape[0] != num_features:
        raise ValueError(f"expected {num_features} train labels, got shape {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"train labels must lie in [0, {num_classes}), got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    return labels


def knn_scores(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
               num_classes: int, ks: Sequence[int], temperature: float = 0.07,
               backend: str = "auto", device: torch.device | str | None = None) -> dict[int, torch.Tensor]:
    """Class scores for several k from one search with the largest k; k is clipped to the train size."""
    train_labels = _check_labels(train_labels, train_features.shape[0], num_classes)
    sims, idx = search_topk(train_features, test_features, max(ks), backend, device)
    neighbor_labels = train_labels[idx]
    return {k: vote(sims[:, :k], neighbor_labels[:, :k], num_classes, temperature) for k in ks}


def weighted_knn(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 num_classes: int, k: int = 20, temperature: float = 0.07, backend: str = "auto",
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Weighted k-NN class scores (num_test, num_classes): cosine top-k, votes exp(sim / T) summed per class."""
    return knn_scores(train_features, train_labels, test_features, num_classes, [k], temperature, backend, device)[k]


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Top-1 and top-5 accuracy in percent; with fewer than 5 classes top-5 is top-(num_classes)."""
    if scores.shape[0] == 0:
        raise ValueError("cannot compute accuracy on an empty test set")
    labels = torch.as_tensor(labels).long().to(scores.device)
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return 100.0 * hits[:, 0].float().mean().item(), 100.0 * hits.any(dim=1).float().mean().item()


def slot_view(features: torch.Tensor, num_slots: int) -> torch.Tensor:
    """View a SPARO encoding (N, L*V) as (N, L, V); slot l is the l-th block of V consecutive dims."""
    if features.ndim != 2 or features.shape[1] % num_slots:
        raise ValueError(f"features of shape {tuple(features.shape)} do not split into {num_slots} slots")
    return features.view(features.shape[0], num_slots, features.shape[1] // num_slots)


def keep_slots(features: torch.Tensor, num_slots: int, slots: Sequence[int]) -> torch.Tensor:
    """The encoding restricted to `slots`, flattened back to (N, len(slots) * V)."""
    kept = slot_view(features, num_slots)[:, list(slots)]
    return kept.reshape(features.shape[0], -1)


def per_slot_top1(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                  test_labels: torch.Tensor, num_slots: int, num_classes: int, k: int = 20,
                  temperature: float = 0.07, backend: str = "auto", device: torch.device | str | None = None
                  ) -> list[float]:
    """k-NN top-1 (percent) of each slot used alone as the encoding."""
    train_slots = slot_view(train_features, num_slots)
    test_slots = slot_view(test_features, num_slots)
    accuracies = []
    for slot in range(num_slots):
        scores = weighted_knn(train_slots[:, slot], train_labels, test_slots[:, slot], num_classes, k,
                              temperature, backend, device)
        accuracies.append(topk_accuracy(scores, test_labels)[0])
    return accuracies


def holdout_split(num_samples: int, holdout_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (fit, holdout) index split of the train set, reproducible from `seed`; both parts non-empty."""
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must lie in (0, 1), got {holdout_fraction}")
    num_holdout = round(holdout_fraction * num_samples)
    if num_holdout < 1 or num_holdout >= num_samples:
        raise ValueError(f"holdout_fraction {holdout_fraction} of {num_samples} train samples leaves an empty "
                         "fit or held-out part")
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    return order[num_holdout:].sort().values, order[:num_holdout].sort().values


def select_slots(train_features: torch.Tensor, train_labels: torch.Tensor, num_slots: int, num_select: int,
                 num_classes: int, holdout_fraction: float = 0.1, k: int = 20, temperature: float = 0.07,
                 seed: int = 0, backend: str = "auto", device: torch.device | str | None = None
                 ) -> tuple[list[int], list[float]]:
    """Rank slots by their k-NN top-1 on a held-out part of the train set and keep the best `num_select`.

    Takes the train set only, by design: the test set cannot leak into the choice of slots.
    Returns (selected slots best first, held-out top-1 of every slot).
    """
    if not 1 <= num_select <= num_slots:
        raise ValueError(f"--select_slots must lie in [1, {num_slots}] (the number of slots), got {num_select}")
    train_labels = torch.as_tensor(train_labels).long().cpu()
    fit, holdout = holdout_split(train_features.shape[0], holdout_fraction, seed)
    accuracies = per_slot_top1(train_features[fit], train_labels[fit], train_features[holdout],
                               train_labels[holdout], num_slots, num_classes, k, temperature, backend, device)
    ranked = sorted(range(num_slots), key=lambda slot: (-accuracies[slot], slot))
    return ranked[:num_select], accuracies
