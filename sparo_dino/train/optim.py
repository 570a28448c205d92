"""Optimizers and parameter updates of the DINO recipe: decay groups, LARS, per-parameter clipping, EMA teacher.

Every per-step operation here works on lists of tensors with torch._foreach kernels and returns device tensors, so
a training step issues no host synchronisation of its own.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn as nn

OPTIMIZERS = ("adamw", "sgd", "lars")


def param_groups(model: nn.Module) -> list[dict]:
    """Two groups: weights that get the scheduled weight decay, and biases / 1-D params (norms) that never do.

    The first group carries `apply_weight_decay=True`, which is how the trainer knows where the schedule goes.
    """
    decayed, not_decayed = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (not_decayed if name.endswith(".bias") or param.ndim <= 1 else decayed).append(param)
    return [{"params": decayed, "apply_weight_decay": True},
            {"params": not_decayed, "weight_decay": 0.0, "apply_weight_decay": False}]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al. 2017), as DINO uses for large batches.

    Params with ndim <= 1 (biases, norms) skip both weight decay and the trust ratio, the usual LARS exclusion.
    """

    def __init__(self, params: Iterable, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                update = param.grad
                if param.ndim > 1:
                    update = update.add(param, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.linalg.vector_norm(param), torch.linalg.vector_norm(update)
                    trust = group["trust_coefficient"] * param_norm / update_norm
                    trust = torch.where((param_norm > 0) & (update_norm > 0), trust, torch.ones_like(trust))
                    update = update * trust
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                buffer = state["momentum_buffer"]
                buffer.mul_(group["momentum"]).add_(update)
                param.add_(buffer, alpha=-group["lr"])
        return loss


def build_optimizer(name: str, groups: list[dict], fused: bool = False) -> torch.optim.Optimizer:
    """The optimizer named by `--optimizer`; lr and weight decay are set by the schedules before every step.

    `fused` makes AdamW update all parameters of a device and dtype in one kernel instead of several foreach
    kernels (the trainer's default, `--fused_adamw`, on CPUs too: see docs/performance.md): the same update up to
    float rounding, and a state dict that loads into either form. SGD and LARS ignore it."""
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, fused=fused or None)  # None: torch's default (foreach)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=0.9)
    if name == "lars":
        return LARS(groups)
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


def set_hyperparameters(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Apply this iteration's scheduled lr to all groups and weight decay to the decayed group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("apply_weight_decay", False):
            group["weight_decay"] = weight_decay


@torch.no_grad()
def clip_gradients_per_parameter(params: Sequence[torch.Tensor], max_norm: float) -> None:
    """Scale each parameter's gradient to norm <= max_norm separately (DINO's rule, not a global norm)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch.stack(torch._foreach_norm(grads))
    scales = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, list(scales.unbind()))


def cancel_last_layer_gradients(model: nn.Module, epoch: int, freeze_last_layer: int) -> None:
    """Drop the head's last-layer gradients during the first `freeze_last_layer` epochs (stabilises the start).

    Setting them to None (not zero) makes the optimizer skip those parameters entirely, momentum state included.
    """
    if epoch >= freeze_last_layer:
        return
    for name, param in model.named_parameters():
        if "last_layer" in name:
            param.grad = None


def cancel_trunk_gradients(trunk_params: Sequence[torch.Tensor], epoch: int, freeze_trunk_epochs: int) -> None:
    """Drop the pretrained trunk's gradients during the first `freeze_trunk_epochs` epochs (--freeze_trunk_epochs):
    the read-out and head learn to read the trunk before the trunk moves. None, as for the last layer, so the
    optimizer skips them (no moments, no weight decay) and their first update after the freeze is Adam's first."""
    if epoch >= freeze_trunk_epochs:
        return
    for param in trunk_params:
        param.grad = None


@torch.no_grad()
def ema_update_(teacher_params: list[torch.Tensor], student_params: list[torch.Tensor], momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, over all parameters in one fused kernel.

    As a lerp (teacher + (1 - momentum) * (student - teacher)), a teacher that equals its student stays bit for
    bit what it is: the mul-then-add form rounds it by an ulp each step, so a trunk frozen in both (--lr 0,
    --freeze_trunk_epochs) would drift away from the file it was loaded from."""
    torch._foreach_lerp_(teacher_params, student_params, 1.0 - momentum)
