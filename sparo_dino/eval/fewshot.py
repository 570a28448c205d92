"""Few-shot evaluation (as DINOv2's few-shot k-NN and linear): n labelled training images per class, several
seeded tries, the mean and spread over tries.

Draws only ever index the training split (the caller passes its labels and nothing else), stratified: exactly n
images of every class the training split holds. Each (seed, n, try) seeds its own generator, so a rerun draws the
same images, tries differ from each other, and the trained network and its random init see the same draws. The
evaluations reuse the features extracted once; nothing is re-extracted per try.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

# Per evaluation set, per column (e.g. "20-NN"), the top-1 of one try.
TryResult = dict[str, dict[str, float]]


def draw_per_class(train_labels: torch.Tensor, n: int, seed: int, attempt: int,
                   classes: Sequence[str] | None = None) -> torch.Tensor:
    """Sorted indices into the training split: `n` distinct images of each class present in `train_labels`, drawn
    from a generator seeded by (seed, n, attempt) alone. A class with fewer than n images is an error (the result
    would not be n-shot)."""
    if n < 1 or seed < 0 or attempt < 0:
        raise ValueError(f"few-shot draws need n >= 1, seed >= 0 and try >= 0, got {n}, {seed}, {attempt}")
    require_shots(train_labels, [n], classes)
    labels = np.asarray(train_labels, dtype=np.int64)
    rng = np.random.default_rng([seed, n, attempt])
    order = np.argsort(labels, kind="stable")
    values, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    chosen = []
    for label, start, count in zip(values, starts, counts):
        chosen.append(order[start + rng.choice(count, n, replace=False)])
    return torch.from_numpy(np.sort(np.concatenate(chosen)) if chosen else np.empty(0, dtype=np.int64))


def require_shots(train_labels: Sequence[int] | torch.Tensor, n_per_class: Sequence[int],
                  classes: Sequence[str] | None = None) -> None:
    """Raise ValueError when a class of the training split has fewer images than the largest n asked for.
    Evaluations call it with the split's labels before extracting any feature, so the mistake costs seconds."""
    labels = np.asarray(train_labels, dtype=np.int64)
    if not n_per_class or not labels.size:
        return
    n = max(n_per_class)
    values, counts = np.unique(labels, return_counts=True)
    for label, count in zip(values, counts):
        if count < n:
            name = classes[label] if classes is not None else str(label)
            raise ValueError(f"--n_per_class {n}: class {name!r} has only {count} training images")


def summarize(values: Sequence[float]) -> dict[str, float | list[float] | None]:
    """Mean and sample standard deviation over tries (None for a single try: no spread was measured)."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return {"mean": mean, "std": std, "values": list(values)}


def run(train_labels: torch.Tensor, n_per_class: Sequence[int], tries: int, seed: int,
        evaluate: Callable[[int, int, torch.Tensor], TryResult], classes: Sequence[str] | None = None
        ) -> dict[str, dict[str, dict[str, dict]]]:
    """{str(n): {set: {column: summary over tries}}}: `evaluate(n, attempt, train_indices)` scores each draw."""
    results: dict[str, dict[str, dict[str, dict]]] = {}
    for n in n_per_class:
        per_try = [evaluate(n, attempt, draw_per_class(train_labels, n, seed, attempt, classes))
                   for attempt in range(tries)]
        results[str(n)] = {name: {column: summarize([result[name][column] for result in per_try])
                                  for column in scores} for name, scores in per_try[0].items()}
    return results
