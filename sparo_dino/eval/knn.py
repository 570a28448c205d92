"""Weighted k-nearest-neighbour classification on frozen encodings (the DINO k-NN protocol) and SPARO slot analysis.

One exact search with the largest k serves every k (faiss IndexFlatIP when installed; chunked torch, the reference,
otherwise). Memory at ImageNet scale, sharding and slot selection: docs/evaluation.md and docs/architecture.md."""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from sparo_dino import distributed
from sparo_dino.eval.subsets import seeded_split

BACKENDS = ("auto", "faiss", "torch")
# How the torch backend holds the L2-normalized bank: fp16 halves its memory (1.28M x 4096: 21 -> 10.5 GB).
BANK_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16}
# Bank rows per step of normalizing and of searching: bounds the transient fp32 copy of the bank.
_BANK_CHUNK_ROWS = 65536
# Elements of one (query chunk x bank chunk) similarity block in the torch backend: 2**27 fp32 = 512 MiB.
_TORCH_BLOCK_ELEMENTS = 2 ** 27

try:
    import faiss
except ImportError:  # faiss is an optional extra (faiss-cpu or faiss-gpu)
    faiss = None


@dataclass(frozen=True)
class SearchPlan:
    """Where and how a search really runs, resolved from what was asked: results files record this, not the ask."""
    backend: str  # faiss | torch
    device: torch.device
    bank_dtype: str  # a BANK_DTYPES key

    def describe(self) -> str:
        return f"{self.backend} on {self.device}, {self.bank_dtype} bank"


def _faiss_gpus() -> int:
    return getattr(faiss, "get_num_gpus", lambda: 0)() if faiss is not None else 0


def _cuda(device: torch.device | None) -> torch.device:
    """A CUDA device with its index (faiss needs the number): this process's current GPU when none is given."""
    if device is not None and device.index is not None:
        return device
    return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)


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


def plan_search(backend: str = "auto", device: torch.device | str | None = None, bank_dtype: str = "fp32",
                features_device: torch.device | str = "cpu") -> SearchPlan:
    """Resolve backend and device once, so a request that cannot be honoured is said, not hidden.

    `device` None: the torch backend searches where the features are, faiss on its GPU when it has one.
    "auto" takes faiss only where it can do what was asked (a GPU search needs faiss-gpu, an fp16 bank the torch
    backend), else the torch backend on the asked device. An explicit faiss asked for a GPU it does not have
    (faiss-cpu) searches on the CPU with a warning."""
    if bank_dtype not in BANK_DTYPES:
        raise ValueError(f"unknown k-NN bank dtype {bank_dtype!r}; choose from {', '.join(BANK_DTYPES)}")
    wanted = torch.device(device) if device is not None else None
    wants_gpu = wanted is not None and wanted.type == "cuda"
    if backend == "auto" and faiss is not None and (bank_dtype != "fp32" or (wants_gpu and not _faiss_gpus())):
        backend = "torch"
    backend = resolve_backend(backend)
    if backend == "torch":
        return SearchPlan("torch", wanted or torch.device(features_device), bank_dtype)
    if bank_dtype != "fp32":
        raise ValueError(f"--bank_dtype {bank_dtype} needs the torch backend (faiss's flat index holds fp32); "
                         "use --knn_backend torch or auto")
    if wanted is None:
        wanted = _cuda(None) if _faiss_gpus() else torch.device("cpu")
    if wanted.type == "cuda" and not _faiss_gpus():
        warnings.warn(f"k-NN search on {wanted} was asked (--use_cuda) but this faiss has no GPU (faiss-cpu): "
                      "searching on the CPU; install faiss-gpu or use --knn_backend torch to search on the GPU")
        wanted = torch.device("cpu")
    return SearchPlan("faiss", _cuda(wanted) if wanted.type == "cuda" else wanted, "fp32")


@functools.lru_cache(maxsize=1)
def _faiss_gpu_resources():
    """One set of GPU scratch memory for all searches (per-slot analysis runs one search per slot)."""
    return faiss.StandardGpuResources()


def _faiss_index(dim: int, device: torch.device):
    """Exact inner-product index on `device`: a GPU index on this rank's own GPU, not faiss's default GPU 0."""
    if device.type != "cuda":
        return faiss.IndexFlatIP(dim)
    config = faiss.GpuIndexFlatConfig()
    config.device = device.index
    return faiss.GpuIndexFlatIP(_faiss_gpu_resources(), dim, config)


def _faiss_search(train: torch.Tensor, test: torch.Tensor, k: int, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    index = _faiss_index(train.shape[1], device)
    index.add(train.numpy())
    sims, idx = index.search(test.numpy(), k)
    return torch.from_numpy(sims), torch.from_numpy(idx).long()


def normalized_rows(features: torch.Tensor, device: torch.device, dtype: torch.dtype = torch.float32
                    ) -> torch.Tensor:
    """L2-normalized rows on `device` in `dtype`, made a chunk at a time.

    Why chunks: moving the bank and then normalizing it held two fp32 copies on the device (42 GB for an ImageNet
    SPARO bank); here the peak is the result plus one fp32 chunk. Rows are normalized in fp32, then cast."""
    out = torch.empty(features.shape, dtype=dtype, device=device)
    for start in range(0, features.shape[0], _BANK_CHUNK_ROWS):
        chunk = features[start:start + _BANK_CHUNK_ROWS].to(device, non_blocking=True).float()
        out[start:start + chunk.shape[0]] = F.normalize(chunk, dim=1)
    return out


def _best(sims: torch.Tensor, values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k highest similarities per row, sorted, with the values (indices or labels) that go with them."""
    top, where = sims.topk(min(k, sims.shape[1]), dim=1, largest=True, sorted=True)
    return top, values.gather(1, where)


def merge_topk(best: tuple[torch.Tensor, torch.Tensor] | None, new: tuple[torch.Tensor, torch.Tensor], k: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (similarities, indices) per row of two candidate sets, sorted by decreasing similarity."""
    if best is None:
        return new
    return _best(torch.cat((best[0], new[0]), dim=1), torch.cat((best[1], new[1]), dim=1), k)


def _torch_search(train: torch.Tensor, test: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over query chunks x bank chunks, each chunk's top-k merged into the running one, so the peak is
    one (query chunk x bank chunk) block, whatever the bank and query counts. An fp16 bank chunk is widened to fp32
    before the product: fp16 rounds the stored features, never the similarities."""
    bank_rows = min(train.shape[0], _BANK_CHUNK_ROWS)
    query_rows = max(1, _TORCH_BLOCK_ELEMENTS // bank_rows)
    sims, idx = [], []
    for start in range(0, test.shape[0], query_rows):
        queries = test[start:start + query_rows]
        best = None
        for offset in range(0, train.shape[0], bank_rows):
            block = queries @ train[offset:offset + bank_rows].float().T
            top, where = block.topk(min(k, block.shape[1]), dim=1, largest=True, sorted=True)
            best = merge_topk(best, (top, where + offset), k)
        sims.append(best[0].cpu())
        idx.append(best[1].cpu())
    if not sims:
        return torch.empty(0, k), torch.empty(0, k, dtype=torch.long)
    return torch.cat(sims), torch.cat(idx)


def search_topk(train_features: torch.Tensor, test_features: torch.Tensor, k: int,
                backend: str = "auto", device: torch.device | str | None = None, bank_dtype: str = "fp32"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact cosine top-k: L2-normalize both sets, return (similarities, train indices), each (num_test, k') on CPU,
    sorted by decreasing similarity, with k' = min(k, num_train).

    `device` and `backend` as plan_search resolves them; a CPU device keeps faiss on the CPU too (the bank may not
    fit in GPU memory). `bank_dtype` fp16 stores the normalized bank in fp16 (torch backend): each similarity is
    then within 2**-11 of fp32's (|a . (b - fp16(b))| <= 2**-11 for unit vectors), the k-th best too."""
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
    plan = plan_search(backend, device, bank_dtype, train_features.device)
    if plan.backend == "faiss":
        if test_features.shape[0] == 0:
            return torch.empty(0, k), torch.empty(0, k, dtype=torch.long)
        cpu = torch.device("cpu")  # faiss reads host memory, whichever device it searches on
        return _faiss_search(normalized_rows(train_features, cpu), normalized_rows(test_features, cpu), k,
                             plan.device)
    train = normalized_rows(train_features, plan.device, BANK_DTYPES[plan.bank_dtype])
    return _torch_search(train, normalized_rows(test_features, plan.device), k)


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
               backend: str = "auto", device: torch.device | str | None = None, bank_dtype: str = "fp32"
               ) -> dict[int, torch.Tensor]:
    """Class scores for several k from one search with the largest k; k is clipped to the train size."""
    train_labels = _check_labels(train_labels, train_features.shape[0], num_classes)
    sims, idx = search_topk(train_features, test_features, max(ks), backend, device, bank_dtype)
    neighbor_labels = train_labels[idx]
    return {k: vote(sims[:, :k], neighbor_labels[:, :k], num_classes, temperature) for k in ks}


def sharded_knn_scores(train_shard: torch.Tensor, train_shard_labels: torch.Tensor, test_features: torch.Tensor,
                       num_classes: int, ks: Sequence[int], temperature: float = 0.07, backend: str = "auto",
                       device: torch.device | str | None = None, bank_dtype: str = "fp32",
                       collective_device: torch.device | str = "cpu") -> dict[int, torch.Tensor]:
    """knn_scores over a train bank split across the ranks (each rank passes its own shard, the same test set).

    Each rank searches its shard and labels its local top-k; all ranks all-gather the (similarity, label) pairs and
    keep the k best, which are the global top-k because every global neighbour is in its own shard's top-k. No rank
    ever holds the whole bank (21 GB at ImageNet x SPARO): each holds 1/world of it and world x k pairs per query.
    `collective_device` carries the collective (the rank's GPU under NCCL). Every rank gets the scores."""
    labels = _check_labels(train_shard_labels, train_shard.shape[0], num_classes)
    num_train = int(distributed.all_reduce_sum_(torch.tensor([train_shard.shape[0]], device=collective_device)))
    if num_train == 0:
        raise ValueError("k-NN needs at least one train sample")
    k = min(max(ks), num_train)
    sims = torch.full((test_features.shape[0], k), float("-inf"))  # a shard with fewer than k rows pads with -inf
    neighbor_labels = torch.zeros(test_features.shape[0], k, dtype=torch.long)
    if train_shard.shape[0]:
        local_sims, local_idx = search_topk(train_shard, test_features, k, backend, device, bank_dtype)
        sims[:, :local_sims.shape[1]], neighbor_labels[:, :local_idx.shape[1]] = local_sims, labels[local_idx]
    world = distributed.get_world_size()

    def gathered(local: torch.Tensor) -> torch.Tensor:  # (world * Q, k) -> (Q, world * k)
        every = distributed.all_gather_tensor(local.to(collective_device)).cpu()
        return every.view(world, *local.shape).permute(1, 0, 2).reshape(local.shape[0], world * k)

    sims, neighbor_labels = _best(gathered(sims), gathered(neighbor_labels), k)
    return {kk: vote(sims[:, :kk], neighbor_labels[:, :kk], num_classes, temperature) for kk in ks}


def weighted_knn(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 num_classes: int, k: int = 20, temperature: float = 0.07, backend: str = "auto",
                 device: torch.device | str | None = None, bank_dtype: str = "fp32") -> torch.Tensor:
    """Weighted k-NN class scores (num_test, num_classes): cosine top-k, votes exp(sim / T) summed per class."""
    return knn_scores(train_features, train_labels, test_features, num_classes, [k], temperature, backend, device,
                      bank_dtype)[k]


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
                  temperature: float = 0.07, backend: str = "auto", device: torch.device | str | None = None,
                  bank_dtype: str = "fp32") -> list[float]:
    """k-NN top-1 (percent) of each slot used alone as the encoding."""
    train_slots = slot_view(train_features, num_slots)
    test_slots = slot_view(test_features, num_slots)
    accuracies = []
    for slot in range(num_slots):
        scores = weighted_knn(train_slots[:, slot], train_labels, test_slots[:, slot], num_classes, k,
                              temperature, backend, device, bank_dtype)
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
    holdout, fit = seeded_split(num_samples, num_holdout, seed)
    return fit, holdout


def select_slots(train_features: torch.Tensor, train_labels: torch.Tensor, num_slots: int, num_select: int,
                 num_classes: int, holdout_fraction: float = 0.1, k: int = 20, temperature: float = 0.07,
                 seed: int = 0, backend: str = "auto", device: torch.device | str | None = None,
                 bank_dtype: str = "fp32") -> tuple[list[int], list[float]]:
    """Rank slots by their k-NN top-1 on a held-out part of the train set and keep the best `num_select`.

    Takes the train set only, by design: the test set cannot leak into the choice of slots.
    Returns (selected slots best first, held-out top-1 of every slot)."""
    if not 1 <= num_select <= num_slots:
        raise ValueError(f"--select_slots must lie in [1, {num_slots}] (the number of slots), got {num_select}")
    train_labels = torch.as_tensor(train_labels).long().cpu()
    fit, holdout = holdout_split(train_features.shape[0], holdout_fraction, seed)
    accuracies = per_slot_top1(train_features[fit], train_labels[fit], train_features[holdout],
                               train_labels[holdout], num_slots, num_classes, k, temperature, backend, device,
                               bank_dtype)
    ranked = sorted(range(num_slots), key=lambda slot: (-accuracies[slot], slot))
    return ranked[:num_select], accuracies
