"""Linear classifier on frozen features: the official DINO protocol and a fast mode on cached features.

One loop for both (fast: centre-crop features, no augmentation, labelled as such); validation and the best-top-1
headline as official DINO, an atomic checkpoint every epoch (docs/evaluation.md, Linear probe)."""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import AttentionPoolLatent

from sparo_dino import distributed
from sparo_dino.io.checkpoint import load_checkpoint, save_checkpoint
from sparo_dino.io.weights import clean_state_dict

PROTOCOLS = {
    "official": "official protocol",
    "fast": "FAST MODE: cached centre-crop features, no augmentation; not the official protocol",
}
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
CHECKPOINT_NAME = "checkpoint_linear.pth"  # in the probe's output folder: resume, and the default head of --evaluate


class LinearClassifier(nn.Module):
    """A linear layer initialised as official DINO (weights N(0, 0.01), zero bias)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, num_classes)
        nn.init.normal_(self.linear.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features.flatten(1))


class AttentiveClassifier(nn.Module):
    """The attentive probe (DINOv2, V-JEPA, CAPI): one cross-attention pooling layer, timm's AttentionPoolLatent
    (a learned query over all tokens, then an MLP), and a linear classifier initialised as LinearClassifier.

    It reads the flattened final-norm tokens a cache holds, (B, tokens * embed_dim), so the probe trains on cached
    features like the linear one; heads of 64 dims, as the ViT's own attention."""

    def __init__(self, embed_dim: int, num_tokens: int, num_classes: int) -> None:
        super().__init__()
        self.num_tokens, self.embed_dim = num_tokens, embed_dim
        self.pool = AttentionPoolLatent(embed_dim, num_heads=max(1, embed_dim // 64), mlp_ratio=4.0)
        self.classifier = LinearClassifier(embed_dim, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        tokens = features.reshape(len(features), self.num_tokens, self.embed_dim)
        return self.classifier(self.pool(tokens))


class HeadGrid(nn.Module):
    """One head per learning rate, trained side by side on the same batches (DINOv2's lr grid): a short probe of
    unfamiliar features then does not hinge on one guessed lr. `make_head` builds one head."""

    def __init__(self, make_head: Callable[[], nn.Module], lrs: Iterable[float]) -> None:
        super().__init__()
        self.lrs = [float(lr) for lr in lrs]
        self.heads = nn.ModuleList(make_head() for _ in self.lrs)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, ...) -> logits (num_heads, B, num_classes)."""
        return torch.stack([head(features) for head in self.heads])

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(head.parameters()), "lr": lr} for head, lr in zip(self.heads, self.lrs)]


class LinearHeads(HeadGrid):
    """The lr grid of LinearClassifiers (--fast's default probe)."""

    def __init__(self, dim: int, num_classes: int, lrs: Iterable[float]) -> None:
        super().__init__(lambda: LinearClassifier(dim, num_classes), lrs)


def _per_head(logits: torch.Tensor) -> torch.Tensor:
    """Logits as (num_heads, B, C): a single classifier is one head."""
    return logits if logits.dim() == 3 else logits[None]


def train_epoch(classifier: nn.Module, batches: Batches, featurize: Callable[[torch.Tensor], torch.Tensor],
                optimizer: torch.optim.Optimizer, device: torch.device, reduce: bool) -> float:
    """One pass of SGD on the classifier, returning the mean loss (over all ranks with `reduce`); the featurizer
    runs without gradients (the backbone is frozen)."""
    classifier.train()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss, samples
    for inputs, labels in batches:
        labels = labels.to(device, non_blocking=True)
        with torch.no_grad():
            feats = featurize(inputs.to(device, non_blocking=True))
        logits = _per_head(classifier(feats))
        # heads are independent: the sum of their mean losses gives each head its own gradient
        losses = torch.stack([F.cross_entropy(head_logits, labels) for head_logits in logits])
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        optimizer.step()
        sums[0] += losses.detach().mean() * len(labels)
        sums[1] += len(labels)
    if reduce:
        distributed.all_reduce_sum_(sums)
    loss_sum, samples = sums.tolist()
    return loss_sum / max(samples, 1.0)


@torch.no_grad()
def evaluate_heads(classifier: nn.Module, batches: Batches, featurize: Callable[[torch.Tensor], torch.Tensor],
                   num_classes: int, device: torch.device, reduce: bool) -> list[dict[str, float]]:
    """Per head: top-1/top-5 (top-min(5, classes)) in percent and mean loss; `reduce` sums the counts of all ranks,
    which is exact when each rank saw a disjoint shard (extraction.ShardSampler)."""
    classifier.eval()
    num_heads = len(classifier.heads) if isinstance(classifier, HeadGrid) else 1
    # per head: correct@1, correct@5, loss, samples; zeros on a rank whose shard is empty, which still all-reduces
    sums = torch.zeros(num_heads, 4, dtype=torch.float64, device=device)
    for inputs, labels in batches:
        labels = labels.to(device, non_blocking=True)
        logits = _per_head(classifier(featurize(inputs.to(device, non_blocking=True))))
        top = logits.topk(min(5, num_classes), dim=2).indices == labels[None, :, None]
        sums[:, 0] += top[:, :, 0].sum(dim=1)
        sums[:, 1] += top.any(dim=2).sum(dim=1)
        sums[:, 2] += torch.stack([F.cross_entropy(head.double(), labels, reduction="sum") for head in logits])
        sums[:, 3] += len(labels)
    if reduce:
        distributed.all_reduce_sum_(sums)
    if not sums[:, 3].all():
        raise ValueError("the validation set is empty")
    return [{"top1": 100.0 * correct1 / samples, "top5": 100.0 * correct5 / samples, "loss": loss / samples,
             "num_samples": int(samples)} for correct1, correct5, loss, samples in sums.tolist()]


def evaluate(classifier: nn.Module, batches: Batches, featurize: Callable[[torch.Tensor], torch.Tensor],
             num_classes: int, device: torch.device, reduce: bool) -> dict[str, float]:
    """evaluate_heads of a single classifier."""
    (metrics,) = evaluate_heads(classifier, batches, featurize, num_classes, device, reduce)
    return metrics


def should_validate(epoch: int, epochs: int, val_freq: int) -> bool:
    """Official DINO's rule: validate after 0-based epochs that are multiples of val_freq, and after the last."""
    return epoch % val_freq == 0 or epoch == epochs - 1


def load_head(path: str, classifier: LinearClassifier, run: dict[str, Any]) -> None:
    """Load a trained head into `classifier` for --evaluate, or raise one line saying why it does not fit.

    Reads this probe's checkpoint_linear.pth (key `classifier`; its recorded run must use the same features and
    classes) or official DINO's linear weights and checkpoint.pth.tar (key `state_dict`, DDP `module.` prefix)."""
    state = load_checkpoint(path, allow_official=True)  # the user named this file (or it is this probe's own)
    head = state.get("classifier", state.get("state_dict"))
    if not isinstance(head, dict):
        raise ValueError(f"{path} holds no linear head (no 'classifier' or 'state_dict' key); "
                         f"top-level keys: {', '.join(map(str, list(state)[:8]))}")
    recorded = state.get("run")
    if recorded is not None:
        for key in ("kind", "num_classes"):
            if recorded.get(key) != run[key]:
                raise ValueError(f"the head in {path} was trained with {key}={recorded.get(key)}, this evaluation "
                                 f"has {key}={run[key]}")
    head = clean_state_dict(head)
    expected = {key: tuple(value.shape) for key, value in classifier.state_dict().items()}
    found = {key: tuple(getattr(value, "shape", ())) for key, value in head.items()}
    if found != expected:
        raise ValueError(f"the head in {path} has {found}, these features need {expected} "
                         f"({run['dim']} features, {run['num_classes']} classes)")
    classifier.load_state_dict(head)


def run_differences(saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> list[str]:
    """`key=saved (this probe: current)` for each key whose value differs, nested dicts (the backbone's options)
    key by key: a user sees what changed instead of two whole run records."""
    lines = []
    for key in sorted(set(saved) | set(current), key=str):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            lines += run_differences(old, new, f"{prefix}{key}.")
        elif old != new:
            lines.append(f"{prefix}{key}={old!r} (this probe: {new!r})")
    return lines


def _resume(path: str, run: dict[str, Any], classifier: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler, key: str = "classifier"
            ) -> tuple[int, dict[str, Any] | None]:
    """Restore a previous probe of the same run from `path` (the trained module under `key`); (next epoch, best
    validation result so far)."""
    if not os.path.isfile(path):
        return 0, None
    state = load_checkpoint(path)
    if state.get("run") != run:
        differences = "; ".join(run_differences(state.get("run") or {}, run))
        raise ValueError(f"{path} belongs to another linear probe: {differences}; use another --output_dir "
                         "(or remove the file to start over)")
    classifier.load_state_dict(state[key])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if distributed.is_main_process():
        print(f"resumed linear probe from {path} after epoch {state['epoch']}", flush=True)
    return state["epoch"], state.get("best")


def fit(classifier: nn.Module, train_batches: Callable[[int], Batches], val_batches: Callable[[], Batches],
        featurize: Callable[[torch.Tensor], torch.Tensor], *, num_classes: int, epochs: int, lr: float,
        val_freq: int, output_dir: str, run: dict[str, Any], device: torch.device, reduce: bool,
        model: nn.Module | None = None) -> dict[str, Any]:
    """Train `classifier` for `epochs` with the official optimizer and schedule; resume from and checkpoint to
    output_dir/checkpoint_linear.pth, append one JSON line per epoch to output_dir/log_linear.txt, and return the final
    and best validation results (best: the highest top-1, official DINO's headline). `model` is what gets optimized
    (e.g. the DDP wrapper of `classifier`)."""
    model = model or classifier
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=0.0)
    checkpoint_path = os.path.join(output_dir, CHECKPOINT_NAME)
    start, best = _resume(checkpoint_path, run, classifier, optimizer, scheduler)
    last = None
    for epoch in range(start, epochs):
        epoch_lr = optimizer.param_groups[0]["lr"]
        train_loss = train_epoch(model, train_batches(epoch), featurize, optimizer, device, reduce)
        scheduler.step()
        record: dict[str, Any] = {"epoch": epoch, "lr": epoch_lr, "train_loss": train_loss}
        if should_validate(epoch, epochs, val_freq):
            last = evaluate(classifier, val_batches(), featurize, num_classes, device, reduce)
            if best is None or last["top1"] > best["top1"]:
                best = {**last, "epoch": epoch}
            record.update({f"val_{key}": value for key, value in last.items()}, best_top1=best["top1"])
            if distributed.is_main_process():
                print(f"Accuracy at epoch {epoch} of the network on the {last['num_samples']} test images: "
                      f"{last['top1']:.1f}%\nMax accuracy so far: {best['top1']:.2f}%", flush=True)
        _end_epoch(output_dir, record, {"classifier": classifier.state_dict(), "optimizer": optimizer.state_dict(),
                                        "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "best": best,
                                        "run": run})
    if last is None:  # resumed after the last epoch: evaluate the restored classifier
        last = evaluate(classifier, val_batches(), featurize, num_classes, device, reduce)
    return {"final": last, "best": best}


def _end_epoch(output_dir: str, record: dict[str, Any], state: dict[str, Any]) -> None:
    """Main process: the epoch's atomic checkpoint (what a rerun resumes from), its log_linear.txt line."""
    if not distributed.is_main_process():
        return
    save_checkpoint(state, os.path.join(output_dir, CHECKPOINT_NAME))
    with open(os.path.join(output_dir, "log_linear.txt"), "a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


def fit_lr_grid(heads: HeadGrid, train_batches: Callable[[int], Batches], holdout_batches: Callable[[], Batches],
                test_batches: Callable[[], Batches], *, num_classes: int, epochs: int, output_dir: str,
                run: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Train every head of the grid in one pass over the same batches (official optimizer and cosine schedule, each
    head at its own lr), choose the head with the best top-1 on the train hold-out after the last epoch, and
    report that head alone on the test set: the test set never picks the lr. Resumes like `fit`; the final
    checkpoint also holds the chosen head as `classifier`, so --evaluate reads it like a single probe's."""
    optimizer = torch.optim.SGD(heads.param_groups(), momentum=0.9, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=0.0)
    checkpoint_path = os.path.join(output_dir, CHECKPOINT_NAME)
    start, _ = _resume(checkpoint_path, run, heads, optimizer, scheduler, key="heads")
    for epoch in range(start, epochs):
        lrs = [group["lr"] for group in optimizer.param_groups]
        train_loss = train_epoch(heads, train_batches(epoch), lambda x: x, optimizer, device, reduce=False)
        scheduler.step()
        _end_epoch(output_dir, {"epoch": epoch, "lrs": lrs, "train_loss": train_loss},
                   {"heads": heads.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "run": run})
    holdout = [metrics["top1"] for metrics in evaluate_heads(heads, holdout_batches(), lambda x: x, num_classes,
                                                             device, reduce=False)]
    chosen = max(range(len(holdout)), key=holdout.__getitem__)  # the first of equals: the smallest lr
    test = evaluate(heads.heads[chosen], test_batches(), lambda x: x, num_classes, device, reduce=False)
    grid = {"lrs": heads.lrs, "holdout_top1": holdout, "chosen": chosen, "chosen_lr": heads.lrs[chosen]}
    state = load_checkpoint(checkpoint_path)
    save_checkpoint({**state, "classifier": heads.heads[chosen].state_dict(), "lr_grid": grid}, checkpoint_path)
    print(f"lr grid: hold-out top-1 {', '.join(f'{lr:g}: {top1:.1f}' for lr, top1 in zip(heads.lrs, holdout))}; "
          f"chose lr {heads.lrs[chosen]:g}", flush=True)
    return {"final": test, "best": {**test, "epoch": epochs - 1}, "lr_grid": grid}


def tensor_batches(features: torch.Tensor, labels: torch.Tensor, batch_size: int,
                   generator: torch.Generator | None = None) -> Batches:
    """Mini-batches of in-memory features, shuffled when a generator is given (the fast mode's data loader)."""
    order = (torch.randperm(len(labels), generator=generator) if generator is not None
             else torch.arange(len(labels)))
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        yield features[index], labels[index]
