"""One DINO optimisation step, eager (the reference) or compiled, with no host synchronisation inside it.

teacher on the 2 global crops -> student on all crops -> DINO loss -> backward -> per-parameter clipping -> last
layer frozen in the first epochs -> optimizer step -> EMA of the teacher. The trainer and benchmarks/step.py run
this same object, so what the benchmark times is what training runs.

`compiled` wraps student, teacher and loss in torch.compile (Inductor fuses the ViT's element-wise work and the
loss over the 65536-way head); the optimizer stays eager and, on GPUs, is the fused AdamW (optim.build_optimizer).
Nothing here reads a device value on the host: the schedule values arrive as Python floats, clipping and EMA are
foreach kernels, and the step returns its metrics as a device tensor, read by the trainer at the logging interval
(fp16's GradScaler is the exception: its inf check reads the device; bf16 needs no scaler).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
import torch.nn as nn

from sparo_dino.loss import DINOLoss, LossOutput
from sparo_dino.optim import cancel_last_layer_gradients, clip_gradients_per_parameter, ema_update_, set_hyperparameters

NUM_GLOBAL_CROPS = 2
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COMPILE_CHOICES = ("auto", "true", "false")


def resolve_compile(flag: str | bool, device: torch.device) -> bool:
    """--compile auto|true|false: auto compiles on CUDA, where it pays; on CPUs compilation takes minutes."""
    if isinstance(flag, bool):
        return flag
    if flag not in COMPILE_CHOICES:
        raise ValueError(f"--compile must be one of {', '.join(COMPILE_CHOICES)}, got {flag!r}")
    return device.type == "cuda" if flag == "auto" else flag == "true"


def _identity(module: nn.Module) -> Callable:
    return module


class TrainingStep:
    """The step over a run's student (`student` may be its DDP wrapper of `student_module`), teacher, DINO loss and
    optimizer; the modules keep their state (checkpoints read them directly, not the compiled wrappers)."""

    def __init__(self, student: nn.Module, student_module: nn.Module, teacher: nn.Module, loss: DINOLoss,
                 optimizer: torch.optim.Optimizer, precision: str, device: torch.device, compiled: bool = False,
                 clip_grad: float = 3.0, freeze_last_layer: int = 1,
                 scaler: torch.amp.GradScaler | None = None) -> None:
        if precision not in DTYPES:
            raise ValueError(f"precision must be one of {', '.join(DTYPES)}, got {precision!r}")
        self.student_module = student_module
        self.loss_module = loss
        self.optimizer = optimizer
        self.precision = precision
        self.device = device
        self.compiled = compiled
        self.clip_grad = clip_grad
        self.freeze_last_layer = freeze_last_layer
        self.scaler = scaler
        wrap = torch.compile if compiled else _identity
        self.student, self.teacher, self.loss = wrap(student), wrap(teacher), wrap(loss)
        self.student_params = list(student_module.parameters())
        self.teacher_params = list(teacher.parameters())
        self.trainable_params = [p for p in self.student_params if p.requires_grad]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the networks compute in (autocast's, or fp32)."""
        return DTYPES[self.precision]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=DTYPES[self.precision])

    def forward(self, crops: Sequence[torch.Tensor], epoch: int) -> LossOutput:
        """Loss and diagnostics of the crops (updates the loss's center, as every training forward does)."""
        with self.autocast():
            with torch.no_grad():
                teacher_output = self.teacher(list(crops[:NUM_GLOBAL_CROPS]))
            student_output = self.student(list(crops))
        return self.loss(student_output, teacher_output, epoch)

    def __call__(self, crops: Sequence[torch.Tensor], epoch: int, lr: float, weight_decay: float,
                 momentum: float) -> torch.Tensor:
        """One optimisation step; returns (loss, teacher entropy, KL) as a device tensor, not synchronised."""
        set_hyperparameters(self.optimizer, lr, weight_decay)
        output = self.forward(crops, epoch)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(output.loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            output.loss.backward()
        if self.clip_grad:
            clip_gradients_per_parameter(self.trainable_params, self.clip_grad)
        cancel_last_layer_gradients(self.student_module, epoch, self.freeze_last_layer)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        ema_update_(self.teacher_params, self.student_params, momentum)
        return torch.stack([output.loss.detach(), output.teacher_entropy, output.kl])
