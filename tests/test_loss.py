"""DINO loss against a straightforward per-pair implementation, and the all-reduced centre update."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparo_dino.train.loss import DINOLoss


def reference_dino_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, num_crops: int,
                        teacher_temp: float, student_temp: float = 0.1):
    """Loss, mean teacher entropy and mean KL(teacher || student), one (teacher, student) pair at a time."""
    student_crops = student.chunk(num_crops)
    teacher_crops = teacher.chunk(2)
    losses, kls, entropies = [], [], []
    for t, teacher_crop in enumerate(teacher_crops):
        log_q = torch.log_softmax(((teacher_crop - center) / teacher_temp).double(), dim=-1)
        q = log_q.exp()
        entropies.append(-(q * log_q).sum(-1).mean())
        for v, student_crop in enumerate(student_crops):
            if v == t:
                continue
            log_p = torch.log_softmax((student_crop / student_temp).double(), dim=-1)
            losses.append((-q * log_p).sum(-1).mean())
            kls.append((q * (log_q - log_p)).sum(-1).mean())
    return (sum(losses) / len(losses), sum(entropies) / len(entropies), sum(kls) / len(kls))


@pytest.mark.parametrize("num_crops", [2, 4])
def test_loss_matches_pairwise_reference(num_crops: int) -> None:
    torch.manual_seed(0)
    out_dim, batch = 32, 5
    student = torch.randn(num_crops * batch, out_dim) * 3
    teacher = torch.randn(2 * batch, out_dim) * 3
    module = DINOLoss(out_dim, num_crops, warmup_teacher_temp=0.04, teacher_temp=0.07,
                      warmup_teacher_temp_epochs=3, epochs=10)
    module.center.copy_(torch.randn(1, out_dim))
    center_before = module.center.clone()
    for epoch, temp in [(0, 0.04), (1, 0.055), (5, 0.07)]:
        module.center.copy_(center_before)
        output = module(student, teacher, module.teacher_temp_tensor(epoch))
        loss, entropy, kl = reference_dino_loss(student, teacher, center_before, num_crops, temp)
        assert output.loss.item() == pytest.approx(loss.item(), rel=1e-5)
        assert output.teacher_entropy.item() == pytest.approx(entropy.item(), rel=1e-4, abs=1e-5)
        assert output.kl.item() == pytest.approx(kl.item(), rel=1e-4, abs=1e-5)


def test_gradient_matches_reference() -> None:
    torch.manual_seed(1)
    student = torch.randn(3 * 4, 16, requires_grad=True)
    teacher = torch.randn(2 * 4, 16)
    DINOLoss(16, 3, 0.04, 0.04, 0, 1)(student, teacher, torch.tensor(0.04)).loss.backward()
    ours = student.grad.clone()
    student.grad = None
    reference_dino_loss(student, teacher, torch.zeros(1, 16), 3, 0.04)[0].backward()
    torch.testing.assert_close(ours, student.grad.float(), rtol=1e-4, atol=1e-7)


def test_center_is_ema_of_teacher_batch_mean() -> None:
    """With the default momentum, which is what the trainer uses: the official 0.9."""
    torch.manual_seed(2)
    teacher = torch.randn(2 * 6, 8)
    module = DINOLoss(8, 2, 0.04, 0.04, 0, 1)
    module.center.fill_(1.0)
    module(torch.randn(2 * 6, 8), teacher, torch.tensor(0.04))
    torch.testing.assert_close(module.center, 0.9 * torch.ones(1, 8) + 0.1 * teacher.mean(0, keepdim=True))
    assert list(module.state_dict()) == ["center"]


def test_collapse_diagnostics_bounds() -> None:
    """A uniform teacher has entropy ln(K); identical student and teacher logits at equal temperature give KL 0."""
    out_dim = 10
    module = DINOLoss(out_dim, 2, 0.1, 0.1, 0, 1)
    uniform = module(torch.randn(4, out_dim), torch.zeros(4, out_dim), torch.tensor(0.1))
    assert uniform.teacher_entropy.item() == pytest.approx(math.log(out_dim), rel=1e-5)
    logits = torch.randn(2, out_dim)
    same = DINOLoss(out_dim, 2, 0.1, 0.1, 0, 1)(torch.cat([logits, logits]), torch.cat([logits, logits]),
                                                torch.tensor(0.1))
    # pairs are (teacher 0, student 1) and (teacher 1, student 0): the same image here, so KL is 0
    assert same.kl.item() == pytest.approx(0.0, abs=1e-5)


def test_too_few_crops_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least 2 crops"):
        DINOLoss(8, 1, 0.04, 0.04, 0, 1)


def _center_worker(rank: int, world_size: int, init_file: str, teacher: torch.Tensor, result_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        module = DINOLoss(teacher.shape[1], 2, 0.04, 0.04, 0, 1)
        module.center.fill_(0.5)
        # each rank holds its share of both global crops, ordered crop-major like the multi-crop wrapper
        crops = teacher.chunk(2)
        share = [crop.chunk(world_size)[rank] for crop in crops]
        module.update_center(torch.cat(share))
        torch.save(module.center, os.path.join(result_dir, f"center{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_center_update_with_two_gloo_processes_equals_single_process(tmp_path) -> None:
    torch.manual_seed(3)
    teacher = torch.randn(2 * 8, 12)
    mp.spawn(_center_worker, args=(2, str(tmp_path / "rendezvous"), teacher, str(tmp_path)), nprocs=2, join=True)
    single = DINOLoss(12, 2, 0.04, 0.04, 0, 1)
    single.center.fill_(0.5)
    single.update_center(teacher)
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"center{rank}.pt", weights_only=True), single.center)
