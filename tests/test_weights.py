"""Reading weights has one implementation: every reader accepts what the others accept, one function maps wrapper
names (DDP's `module.`, MultiCropWrapper's `backbone.`, old weight-norm names), and the model file reads no files."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import sparo_vit
from sparo_dino.cli import train_flags
from sparo_dino.io import weights

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = {"arch": "vit_tiny", "patch_size": 8, "img_size": 32}


def test_clean_state_dict_maps_every_wrapper_to_the_module_names() -> None:
    one, two, three = torch.ones(1), torch.zeros(2), torch.full((3,), 2.0)
    saved = {"module.backbone.blocks.0.norm1.weight": one, "module.head.last_layer.weight_g": two,
             "module.head.last_layer.weight_v": three}
    assert weights.clean_state_dict(saved) == {
        "backbone.blocks.0.norm1.weight": one, "head.last_layer.parametrizations.weight.original0": two,
        "head.last_layer.parametrizations.weight.original1": three}
    assert weights.clean_state_dict(saved, "backbone") == {"blocks.0.norm1.weight": one}
    # a plain backbone state dict is the backbone's own: nothing is dropped
    assert weights.clean_state_dict({"module.cls_token": one, "pos_embed": two}, "backbone") == {
        "cls_token": one, "pos_embed": two}


def _layouts(tmp_path: pathlib.Path, state: dict[str, torch.Tensor]) -> dict[str, str]:
    """The same backbone weights as the files users bring: a training checkpoint, a DDP state dict, timm's
    {"model": ...} and a safetensors file."""
    files = {"checkpoint": {"teacher": {f"backbone.{k}": v for k, v in state.items()}, "config": dict(TINY)},
             "ddp": {f"module.{k}": v for k, v in state.items()},
             "timm": {"model": {f"module.{k}": v for k, v in state.items()}}}
    paths = {}
    for name, content in files.items():
        paths[name] = str(tmp_path / f"{name}.pth")
        torch.save(content, paths[name])
    paths["safetensors"] = str(tmp_path / "weights.safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, paths["safetensors"])
    return paths


def test_evaluation_hub_and_trunk_read_the_same_files(tmp_path) -> None:
    torch.manual_seed(0)
    state = sparo_vit.build_backbone(**TINY).state_dict()
    for layout, path in _layouts(tmp_path, state).items():
        torch.testing.assert_close(weights.read_weights(path).state_dict, state, msg=layout)
        hub = torch.hub.load(str(REPO), "vit_tiny", source="local", weights=path, patch_size=8, img_size=32)
        torch.testing.assert_close(hub.state_dict(), state, msg=layout)
        trunk = sparo_vit.build_backbone(**TINY)
        assert weights.load_pretrained_trunk(trunk, path).missing == [], layout
        torch.testing.assert_close(trunk.state_dict(), state, msg=layout)


def test_no_other_module_renames_checkpoint_keys() -> None:
    """Another copy of the prefix or weight-norm handling would drift from this one (they once differed)."""
    sources = [*REPO.glob("*.py"), *(REPO / "sparo_dino").rglob("*.py")]
    copies = sorted({str(path.relative_to(REPO)) for path in sources
                     for needle in ('removeprefix("module.")', "weight_g")
                     if needle in path.read_text() and path.name != "weights.py"})
    assert copies == []


def _imported_modules(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    return set(result.stdout.split())


def test_the_model_file_reads_no_checkpoints_and_the_hub_needs_only_weight_reading() -> None:
    # sparo_vit re-exports sparo_dino/model/: the networks, nothing that reads files
    assert {name for name in _imported_modules("import sparo_vit") if name.startswith("sparo_dino.")} <= {
        "sparo_dino.model", "sparo_dino.model.readouts", "sparo_dino.model.readouts.pooling",
        "sparo_dino.model.readouts.mhca", "sparo_dino.model.readouts.sparo", "sparo_dino.model.readouts.mhmix",
        "sparo_dino.model.registry",
        "sparo_dino.model.backbone", "sparo_dino.model.head", "sparo_dino.model.attention_maps"}
    hub = _imported_modules("import hubconf")
    assert "sparo_dino.io.weights" in hub
    assert not hub & {"sparo_dino.eval.extraction", "sparo_dino.eval.feature_cache", "sparo_dino.cli.eval_flags"}


def test_backbone_options_and_resume_keys_are_named_for_what_they_are() -> None:
    assert weights.BACKBONE_OPTION_KEYS == ("arch", "patch_size", "img_size", "pos_embed_interpolation",
                                            "num_slots", "slot_dim", "attn_dim", "group_size", "slot_norm",
                                            "slot_wise")
    # a resume must also keep the DINO head: other head sizes cannot load the checkpoint's weights
    assert set(train_flags.RESUME_MUST_MATCH_KEYS) == set(weights.BACKBONE_OPTION_KEYS) | {
        "out_dim", "use_bn_in_head", "norm_last_layer"}
    assert not hasattr(weights, "MODEL_KEYS") and not hasattr(train_flags, "MODEL_KEYS")


def test_a_missing_trunk_file_names_itself(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        weights.load_pretrained_trunk(sparo_vit.build_backbone(**TINY), str(tmp_path / "missing.safetensors"))
