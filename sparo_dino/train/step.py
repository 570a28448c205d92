"""One DINO optimisation step, eager (the reference) or compiled, with no host synchronisation inside it.

The trainer and benchmarks/step.py run this same object; its parts and the device reads it avoids:
docs/architecture.md (one training step, design notes)."""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Sequence

import torch
import torch.nn as nn

from sparo_dino import distributed, node_limits
from sparo_dino.train.loss import DINOLoss, LossOutput
from sparo_dino.train.optim import (
    cancel_last_layer_gradients,
    cancel_trunk_gradients,
    clip_gradients_per_parameter,
    ema_update_,
    set_hyperparameters,
)

NUM_GLOBAL_CROPS = 2
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COMPILE_CHOICES = ("auto", "true", "false")
PRECISIONS = ("auto", *DTYPES)


def resolve_compile(flag: str | bool, device: torch.device) -> bool:
    """--compile auto|true|false: auto compiles on CUDA, where it pays; on CPUs compilation takes minutes."""
    if isinstance(flag, bool):
        return flag
    if flag not in COMPILE_CHOICES:
        raise ValueError(f"--compile must be one of {', '.join(COMPILE_CHOICES)}, got {flag!r}")
    return device.type == "cuda" if flag == "auto" else flag == "true"


def resolve_precision(precision: str, use_fp16: bool | None, device: torch.device) -> str:
    """The effective precision: the official --use_fp16 wins when given, auto picks bf16 on capable GPUs."""
    if use_fp16 is not None:
        wanted = "fp16" if use_fp16 else "fp32"
        if precision not in ("auto", wanted):
            raise ValueError(f"--use_fp16 {str(use_fp16).lower()} contradicts --precision {precision}")
        return wanted
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if native_bf16(device) else "fp16"


def native_bf16(device: torch.device) -> bool:
    """Whether the GPU computes in bf16 itself. torch.cuda.is_bf16_supported() also says yes where bf16 is only
    emulated (V100: several times slower than fp16), so auto would pick the slow path there."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch without the keyword: bf16 tensor cores arrived with compute capability 8.0
        return torch.cuda.get_device_capability(device) >= (8, 0)


def _first_line(error: BaseException) -> str:
    """The message a user can act on: a backend's failure wraps the error it raised (inner_exception), whose first
    line names the problem, where the wrapper's own first line only names the backend."""
    inner = getattr(error, "inner_exception", None)
    if isinstance(inner, BaseException):
        error = inner
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def ran_compiled_graph(tensor: torch.Tensor, stop_at: torch.Tensor | None = None) -> bool:
    """Whether `tensor` was computed by a graph that torch.compile compiled: its autograd graph holds the node of
    AOTAutograd's CompiledFunction (every backend that trains, Inductor and aot_eager, runs through AOTAutograd; the
    class has had this name since torch 2.0). The search does not go past `stop_at`'s node (the network whose
    output fed this one, checked on its own)."""
    seen = {stop_at.grad_fn} if stop_at is not None and stop_at.grad_fn is not None else set()
    stack = [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        if type(node).__name__ == "CompiledFunctionBackward":
            return True
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


class _EagerIfCompilationFails:
    """A compiled module on its first step: a torch._dynamo error (tracing, or the backend's compilation, which
    dynamo wraps as BackendCompilerFailed; Inductor's errors derive from it) runs the eager module instead and is
    kept for TrainingStep to settle. Compilation happens before the compiled code runs, so nothing ran twice."""

    def __init__(self, compiled: Callable, eager: nn.Module) -> None:
        self.compiled, self.eager = compiled, eager
        self.error: Exception | None = None

    def __call__(self, *args: object) -> object:
        if self.error is None:
            try:
                return self.compiled(*args)
            except torch._dynamo.exc.TorchDynamoException as error:
                self.error = error
        return self.eager(*args)


def _backward_compiled_with_forward() -> contextlib.AbstractContextManager:
    """Make AOTAutograd compile the backward graph with the forward (on torch versions that can), so that a failing
    backward compilation surfaces in the guarded first forward, not in the middle of DDP's gradient all-reduce."""
    from torch._functorch import config  # loaded with torch.compile, not with torch

    if not hasattr(config, "force_non_lazy_backward_lowering"):
        return contextlib.nullcontext()
    return config.patch(force_non_lazy_backward_lowering=True)


class TrainingStep:
    """The step over a run's student (`student` may be its DDP wrapper of `student_module`), teacher, DINO loss and
    optimizer; the modules keep their state (checkpoints read them directly, not the compiled wrappers).

    `compiled` wraps student, teacher and loss in torch.compile with `compile_backend` (tests pass "aot_eager", which
    traces the same graphs without Inductor's code generation). If compiling fails on the first step, or compiles
    nothing, on any rank, every rank continues eagerly after one warning: an 8-GPU job loses speed, not its
    allocation, and no two ranks run different graphs. `ran_compiled` says what the first step really ran (None
    before it): provenance and `make gpu-check` read it, not the flag."""

    def __init__(self, student: nn.Module, student_module: nn.Module, teacher: nn.Module, loss: DINOLoss,
                 optimizer: torch.optim.Optimizer, precision: str, device: torch.device, compiled: bool = False,
                 clip_grad: float = 3.0, freeze_last_layer: int = 1,
                 scaler: torch.amp.GradScaler | None = None, compile_backend: str | Callable = "inductor",
                 freeze_trunk_epochs: int = 0, trunk_params: Sequence[torch.Tensor] = ()) -> None:
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
        self.freeze_trunk_epochs, self.trunk_params = freeze_trunk_epochs, list(trunk_params)
        self.scaler = scaler
        self.ran_compiled: bool | None = None
        self.networks: tuple[Callable, Callable, Callable] = (student, teacher, loss)
        if compiled:
            node_limits.bound_compile_threads()  # before the first step compiles: a share of the node per rank
            self.networks = tuple(_EagerIfCompilationFails(torch.compile(module, backend=compile_backend), module)
                                  for module in self.networks)
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
        if isinstance(self.networks[0], _EagerIfCompilationFails):
            with _backward_compiled_with_forward():
                student_output, output = self._forward(crops, epoch)
            self._settle_compilation(student_output, output)
            return output
        self.ran_compiled = False
        return self._forward(crops, epoch)[1]

    def _forward(self, crops: Sequence[torch.Tensor], epoch: int) -> tuple[torch.Tensor, LossOutput]:
        """The student's output (for the compiled-or-not check) and the loss."""
        student, teacher, loss = self.networks
        with self.autocast():
            with torch.no_grad():
                teacher_output = teacher(list(crops[:NUM_GLOBAL_CROPS]))
            student_output = student(list(crops))
        # the temperature is looked up here, outside the compiled loss (see DINOLoss)
        return student_output, loss(student_output, teacher_output, self.loss_module.teacher_temp_tensor(epoch))

    def _settle_compilation(self, student_output: torch.Tensor, output: LossOutput) -> None:
        """After the first compiled forward: keep the compiled modules if every rank ran the student and the loss as
        compiled graphs, else run all eagerly on every rank. One all-reduce and host read, on this step only (each
        rank's fallback ran the eager module in place of the compiled one, so their collectives still matched up to
        here). The teacher, run without autograd, leaves no node to check: a compile error of its own still counts."""
        guards = self.networks
        errors = [guard.error for guard in guards if guard.error is not None]
        nothing_compiled = not errors and not (ran_compiled_graph(student_output)
                                               and ran_compiled_graph(output.loss, stop_at=student_output))
        failed = torch.tensor(float(len(errors) + nothing_compiled), device=self.device)
        if not distributed.all_reduce_sum_(failed).item():
            self.networks = tuple(guard.compiled for guard in guards)
            self.ran_compiled = True
            return
        self.networks = tuple(guard.eager for guard in guards)
        self.compiled = self.ran_compiled = False
        if errors:
            cause = _first_line(errors[0])
        elif nothing_compiled:
            cause = ("not compiled: no compiled graph ran, and torch raised nothing (TORCH_COMPILE_DISABLE=1? an "
                     "error hidden by torch._dynamo.config.suppress_errors?)")
        else:
            cause = "on another rank"
        warnings.warn(f"torch.compile failed ({cause}); training continues eagerly on every rank (slower, same "
                      "results; --compile false skips compiling)", RuntimeWarning, stacklevel=3)

    def __call__(self, crops: Sequence[torch.Tensor], epoch: int, lr: float, weight_decay: float,
                 momentum: float) -> torch.Tensor:
        """One optimisation step; returns the loss's metrics (loss.STEP_METRICS, in order) as one device tensor, not
        synchronised."""
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
        cancel_trunk_gradients(self.trunk_params, epoch, self.freeze_trunk_epochs)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        ema_update_(self.teacher_params, self.student_params, momentum)
        return torch.stack([metric.detach() for metric in output])
