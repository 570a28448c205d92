"""The DINO self-distillation loss: cross-entropy between a centred, sharpened teacher and the student.

The teacher sees the global crops, the student every crop; each (teacher crop, student crop) pair of different
views adds one cross-entropy term. The teacher's output is centred with an EMA of its batch mean (all-reduced, so
every rank centres with the statistics of the global batch) and sharpened with a low temperature; those two
opposing forces are what keeps DINO from collapsing. Next to the loss the module reports the two collapse
diagnostics of the DINO paper (Fig. 7): teacher entropy and the student-teacher KL divergence.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparo_dino import distributed
from sparo_dino.train.schedules import teacher_temperature_schedule


class LossOutput(NamedTuple):
    loss: torch.Tensor
    teacher_entropy: torch.Tensor  # mean entropy (nats) of the teacher distributions: -> 0 means one-hot collapse
    kl: torch.Tensor  # mean KL(teacher || student) over the loss pairs: -> 0 with high entropy means uniform collapse


class DINOLoss(nn.Module):
    """DINO loss with centring and a per-epoch teacher temperature schedule.

    The only state is the `center` buffer, so `state_dict()` is exactly what a checkpoint must keep. The schedule is
    looked up outside `forward` (`teacher_temp`), and `forward` takes the temperature as a 0-d tensor: under
    torch.compile a numpy lookup breaks the graph and a Python number is a constant, recompiled for every new value.
    """

    def __init__(self, out_dim: int, num_crops: int, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_epochs: int, epochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9, num_teacher_crops: int = 2) -> None:
        super().__init__()
        if num_crops < max(2, num_teacher_crops):
            raise ValueError(f"the DINO loss needs at least 2 crops and as many student as teacher crops, "
                             f"got {num_crops} student and {num_teacher_crops} teacher crops")
        self.num_crops = num_crops
        self.num_teacher_crops = num_teacher_crops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temps = teacher_temperature_schedule(warmup_teacher_temp, teacher_temp,
                                                          warmup_teacher_temp_epochs, epochs)

    def teacher_temp(self, epoch: int) -> float:
        """Temperature of `epoch`; epochs past the schedule (a run extended on resume) keep the final value."""
        return float(self.teacher_temps[min(epoch, len(self.teacher_temps) - 1)])

    def teacher_temp_tensor(self, epoch: int) -> torch.Tensor:
        """`teacher_temp(epoch)` as the 0-d CPU tensor `forward` takes: a CPU scalar joins device tensors' arithmetic
        (and Inductor's kernels) as a kernel argument, without a host-to-device copy."""
        return torch.tensor(self.teacher_temp(epoch), dtype=torch.float32)

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor,
                teacher_temp: torch.Tensor) -> LossOutput:
        """Loss of one step at the teacher temperature `teacher_temp` (0-d tensor, see `teacher_temp_tensor`), then
        the centre update with this step's teacher output.

        `student_output` is (num_crops * B, out_dim) ordered crop-major (as the multi-crop wrapper returns it) with
        the global crops first; `teacher_output` is (num_teacher_crops * B, out_dim). Both are computed in fp32.
        """
        student_logp = F.log_softmax(student_output.float() / self.student_temp, dim=-1).chunk(self.num_crops)
        teacher_logq = F.log_softmax((teacher_output.float() - self.center) / teacher_temp, dim=-1)
        teacher_q = teacher_logq.exp()
        # sum_{v != t} <q_t, log p_v> = <q_t, sum_v log p_v> - <q_t, log p_t>: one log_softmax per crop, two products
        # per teacher crop instead of one per pair.
        logp_sum = torch.stack(student_logp).sum(dim=0)
        cross = 0.0
        for t, q in enumerate(teacher_q.chunk(self.num_teacher_crops)):
            cross = cross + (q * (logp_sum - student_logp[t])).sum(dim=-1).mean()
        num_pairs = self.num_teacher_crops * (self.num_crops - 1)
        loss = -cross / num_pairs
        with torch.no_grad():
            # Every teacher crop appears in num_crops - 1 pairs, so the pair mean of H(q_t) is the plain mean and
            # KL = cross-entropy - entropy needs no second pass over the pairs.
            entropy = -(teacher_q * teacher_logq).sum(dim=-1).mean()
            kl = loss.detach() - entropy
        self.update_center(teacher_output)
        return LossOutput(loss, entropy, kl)

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """EMA of the teacher's mean output over the global batch (summed over ranks, then averaged)."""
        batch_sum = teacher_output.float().sum(dim=0, keepdim=True)
        distributed.all_reduce_sum_(batch_sum)
        batch_center = batch_sum / (teacher_output.shape[0] * distributed.get_world_size())
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)
