"""The pieces of one training step against straightforward references: decay groups, clipping, last-layer
freezing, EMA, LARS, schedule application, and the student/teacher builder."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from sparo_dino.optim import (LARS, build_optimizer, cancel_last_layer_gradients, clip_gradients_per_parameter,
                              ema_update_, param_groups, set_hyperparameters)
from sparo_dino.trainer import build_student_teacher

CONFIG = {"arch": "vit_tiny_sparo", "patch_size": 8, "img_size": 32, "out_dim": 32, "use_bn_in_head": False,
          "norm_last_layer": True, "drop_path_rate": 0.1, "num_slots": 4, "slot_dim": 8, "attn_dim": 8,
          "group_size": 1}


@pytest.fixture(scope="module")
def networks():
    torch.manual_seed(0)
    return build_student_teacher(CONFIG)


def test_student_and_teacher(networks) -> None:
    student, teacher = networks
    assert all(not p.requires_grad for p in teacher.parameters())
    for (name, a), (_, b) in zip(student.state_dict().items(), teacher.state_dict().items()):
        assert torch.equal(a, b), name
    assert student.backbone.num_features == 4 * 8
    assert not student.head.last_layer.parametrizations.weight.original0.requires_grad  # norm_last_layer
    drop_rates = {round(m.drop_prob, 6) for m in student.modules() if hasattr(m, "drop_prob")}
    assert max(drop_rates) == pytest.approx(0.1)
    assert all(m.drop_prob == 0 for m in teacher.modules() if hasattr(m, "drop_prob"))


def test_decay_groups_follow_the_official_rule(networks) -> None:
    student, _ = networks
    decayed, not_decayed = param_groups(student)
    names = {id(p): n for n, p in student.named_parameters()}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    not_decayed_names = {names[id(p)] for p in not_decayed["params"]}
    assert "backbone.sparo.query" in decayed_names and "backbone.sparo.key.weight" in decayed_names
    assert "backbone.sparo.key.bias" in not_decayed_names and "backbone.norm.weight" in not_decayed_names
    assert "backbone.cls_token" in decayed_names  # 3-D: the official rule only spares biases and 1-D params
    assert all(n.endswith(".bias") or student.get_parameter(n).ndim == 1 for n in not_decayed_names)
    assert not any("original0" in n for n in decayed_names | not_decayed_names)  # frozen magnitude: no group
    assert decayed["apply_weight_decay"] and not not_decayed["apply_weight_decay"]
    assert not_decayed["weight_decay"] == 0.0


def test_set_hyperparameters_decays_only_the_first_group() -> None:
    model = nn.Linear(3, 2)
    optimizer = build_optimizer("adamw", param_groups(model))
    set_hyperparameters(optimizer, lr=0.1, weight_decay=0.3)
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.1]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.3, 0.0]
    assert isinstance(build_optimizer("sgd", param_groups(model)), torch.optim.SGD)
    assert isinstance(build_optimizer("lars", param_groups(model)), LARS)
    with pytest.raises(ValueError, match="adamw, sgd, lars"):
        build_optimizer("adam", param_groups(model))


def test_per_parameter_clipping() -> None:
    params = [nn.Parameter(torch.zeros(4)) for _ in range(3)]
    grads = [torch.full((4,), 10.0), torch.full((4,), 0.1), torch.tensor([3.0, 4.0, 0.0, 0.0])]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    clip_gradients_per_parameter(params, max_norm=3.0)
    for p, g in zip(params, grads):
        norm = g.norm().item()
        expected = g * (3.0 / (norm + 1e-6)) if 3.0 / (norm + 1e-6) < 1 else g
        torch.testing.assert_close(p.grad, expected)


def test_last_layer_gradients_are_dropped_while_frozen(networks) -> None:
    student, _ = networks
    for p in student.parameters():
        p.grad = torch.ones_like(p) if p.requires_grad else None
    cancel_last_layer_gradients(student, epoch=1, freeze_last_layer=1)
    assert student.head.last_layer.parametrizations.weight.original1.grad is not None
    cancel_last_layer_gradients(student, epoch=0, freeze_last_layer=1)
    assert student.head.last_layer.parametrizations.weight.original1.grad is None
    assert student.head.mlp[0].weight.grad is not None
    student.zero_grad(set_to_none=True)


def test_ema_update() -> None:
    teacher = [torch.ones(3), torch.zeros(2, 2)]
    student = [torch.full((3,), 3.0), torch.ones(2, 2)]
    ema_update_(teacher, student, momentum=0.9)
    torch.testing.assert_close(teacher[0], torch.full((3,), 0.9 + 0.3))
    torch.testing.assert_close(teacher[1], torch.full((2, 2), 0.1))


def test_lars_step_matches_formula() -> None:
    torch.manual_seed(0)
    weight, bias = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(4))
    weight.grad, bias.grad = torch.randn(4, 3), torch.randn(4)
    w0, b0, gw, gb = weight.detach().clone(), bias.detach().clone(), weight.grad.clone(), bias.grad.clone()
    optimizer = LARS([{"params": [weight], "weight_decay": 0.1}, {"params": [bias], "weight_decay": 0.1}],
                     lr=0.5, momentum=0.9, trust_coefficient=0.001)
    optimizer.step()
    update = gw + 0.1 * w0
    trust = 0.001 * w0.norm() / update.norm()
    torch.testing.assert_close(weight.detach(), w0 - 0.5 * trust * update)
    torch.testing.assert_close(bias.detach(), b0 - 0.5 * gb)  # 1-D: no decay, no trust ratio
    optimizer.step()  # same gradients again: the momentum buffer adds up
    update2 = gw + 0.1 * (w0 - 0.5 * trust * update)
    trust2 = 0.001 * (w0 - 0.5 * trust * update).norm() / update2.norm()
    expected = w0 - 0.5 * trust * update - 0.5 * (0.9 * trust * update + trust2 * update2)
    torch.testing.assert_close(weight.detach(), expected)
