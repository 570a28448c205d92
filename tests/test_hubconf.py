"""hubconf.py through torch.hub.load(..., source="local"): checkpoint configs, teacher/student, fresh models, no
downloads."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from test_features import SPARO_TINY

import sparo_vit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Any attempt to fetch weights fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"download attempted: {args}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def hub_load(entry: str, **kwargs) -> torch.nn.Module:
    return torch.hub.load(REPO, entry, source="local", **kwargs)


def write_training_checkpoint(path, options) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A checkpoint in the trainer's layout whose teacher and student differ; returns (teacher, student)."""
    networks = []
    for seed, prefix in ((0, ""), (1, "module.")):
        torch.manual_seed(seed)
        networks.append((sparo_vit.build_backbone(**options).eval(), prefix))
    state = {key: {f"{prefix}backbone.{name}": value for name, value in net.state_dict().items()}
             | {f"{prefix}head.last_layer.weight": torch.zeros(3, 3)}
             for key, (net, prefix) in zip(("teacher", "student"), networks)}
    torch.save({**state, "config": {**options, "out_dim": 3, "lr": 5e-4}, "epoch": 1}, path)
    return networks[0][0], networks[1][0]


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_every_arch_is_an_entry_point_and_nothing_else():
    """torch.hub.list's rule (it has no local source): public callables of hubconf are the entry points."""
    spec = importlib.util.spec_from_file_location("hubconf_under_test", os.path.join(REPO, "hubconf.py"))
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    entries = [name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")]
    assert sorted(entries) == sorted(sparo_vit.ARCHS)


def test_training_checkpoint_gives_the_teacher_or_the_student_built_from_its_config(tmp_path):
    path = str(tmp_path / "checkpoint.pth")
    teacher, student = write_training_checkpoint(path, SPARO_TINY)
    images = torch.randn(2, 3, 32, 32)
    loaded = hub_load("vit_tiny_sparo", weights=path)
    assert loaded.sparo.num_slots == 4 and loaded.num_features == 4 * 16 and loaded.patch_embed.patch_size == (8, 8)
    assert same_weights(loaded, teacher) and not same_weights(loaded, student)
    assert torch.equal(loaded(images), teacher(images))
    assert all(p.requires_grad for p in loaded.parameters())
    loaded_student = hub_load("vit_tiny_sparo", weights=path, checkpoint_key="student")
    assert same_weights(loaded_student, student)
    assert torch.equal(hub_load("vit_tiny_sparo", weights=path, patch_size=8).pos_embed, teacher.pos_embed)


def test_plain_state_dict_in_official_layout(tmp_path):
    """Official DINO publishes plain backbone state dicts (ViT-S/16: patch 16, img 224)."""
    torch.manual_seed(0)
    official = sparo_vit.build_backbone("vit_tiny").eval()
    path = str(tmp_path / "dino_deittiny16_pretrain.pth")
    torch.save(official.state_dict(), path)
    assert same_weights(hub_load("vit_tiny", weights=path), official)
    torch.save(sparo_vit.build_backbone("vit_tiny", patch_size=8).state_dict(), path)
    with pytest.raises(ValueError, match="do not fit {'arch': 'vit_tiny', 'patch_size': 16}"):
        hub_load("vit_tiny", weights=path)
    assert hub_load("vit_tiny", weights=path, patch_size=8).patch_embed.patch_size == (8, 8)


def test_no_weights_gives_a_fresh_backbone_and_pretrained_is_refused():
    fresh = hub_load("vit_tiny_sparo", patch_size=8, img_size=32, num_slots=8, slot_dim=4)
    assert fresh.num_features == 32 and fresh(torch.randn(1, 3, 32, 32)).shape == (1, 32)
    assert hub_load("vit_small").num_features == 384
    with pytest.raises(ValueError, match="no pretrained weights are published for vit_small_sparo"):
        hub_load("vit_small_sparo", pretrained=True)


def test_bad_hub_arguments_name_the_problem(tmp_path):
    path = str(tmp_path / "checkpoint.pth")
    write_training_checkpoint(path, SPARO_TINY)
    with pytest.raises(ValueError, match="holds a vit_tiny_sparo backbone; load it with the 'vit_tiny_sparo' entry"):
        hub_load("vit_small_sparo", weights=path)
    with pytest.raises(ValueError, match="--num_slots 8 conflicts with the checkpoint's config"):
        hub_load("vit_tiny_sparo", weights=path, num_slots=8)
    with pytest.raises(ValueError, match="has no 'ema' network"):
        hub_load("vit_tiny_sparo", weights=path, checkpoint_key="ema")
    with pytest.raises(TypeError, match="drop_path_rate cannot be set when loading weights"):
        hub_load("vit_tiny_sparo", weights=path, drop_path_rate=0.1)
