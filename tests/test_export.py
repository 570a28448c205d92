"""export_model.py: a trained backbone as model.safetensors + config.json + README.md model card, loaded back by timm
(a local file, `local-dir:`), torch.hub and the evaluations with the original outputs; ONNX (onnxruntime when
installed) and torch.export forms with a dynamic batch; --push_to_hub up to the upload itself, which is replaced
(no network here)."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os

import pytest
import timm
import torch
from test_train import TINY

import eval_knn
import export_model
import main_dino
import sparo_vit
from sparo_dino.io import export, weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPARO = ["--arch", "vit_tiny_sparo", "--num_slots", "4", "--slot_dim", "8", "--attn_dim", "8"]
EVAL = ["--dataset", "imagefolder", "--resize_size", "32", "--crop_size", "32", "--batch_size_per_gpu", "8",
        "--num_workers", "0", "--nb_knn", "5", "--use_cuda", "false"]
HAS_ONNX = all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript"))


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def run_dir(images, tmp_path_factory) -> str:
    """A real (tiny) training run of vit_tiny_sparo with its k-NN evaluation at random init beside it."""
    out = str(tmp_path_factory.mktemp("run"))
    argv = list(TINY)
    argv[argv.index("--arch") + 1] = "vit_tiny_sparo"
    assert main_dino.main([*argv, *SPARO[2:], "--data_path", images, "--output_dir", out, "--epochs", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def teacher(run_dir) -> torch.nn.Module:
    backbone, _, _ = weights.load_backbone(argparse.Namespace(
        pretrained_weights=os.path.join(run_dir, "checkpoint.pth"), checkpoint_key="teacher",
        **{key: None for key in weights.BACKBONE_OPTION_KEYS}))
    return backbone


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("export") / "vit_tiny_sparo_dino")
    export_model.main(["--pretrained_weights", os.path.join(run_dir, "checkpoint.pth"), "--output_dir", folder])
    return folder


def images_batch(size: int = 32, batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(7))


def test_the_folder_holds_weights_config_and_card(exported) -> None:
    assert sorted(os.listdir(exported)) == ["README.md", "config.json", "model.safetensors"]
    with open(os.path.join(exported, "config.json")) as handle:
        config = json.load(handle)
    assert config["architecture"] == "vit_tiny_sparo" and config["num_features"] == 4 * 8
    assert config["model_args"] == {"patch_size": 8, "img_size": 32, "pos_embed_interpolation": "dino",
                                    "num_slots": 4, "slot_dim": 8, "attn_dim": 8, "group_size": 1,
                                    "slot_norm": False}
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert config["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406]
    assert config["sparo_dino"]["epoch"] == 1 and config["sparo_dino"]["run_config"]["out_dim"] == 64


def test_timm_hub_and_evaluations_load_the_original_backbone(exported, teacher) -> None:
    images = images_batch()
    expected = teacher(images)
    by_file = timm.create_model("vit_tiny_sparo", pretrained=True,
                                pretrained_cfg_overlay=dict(file=os.path.join(exported, "model.safetensors")))
    by_folder = timm.create_model(f"local-dir:{exported}", pretrained=True)
    hub = torch.hub.load(REPO, "vit_tiny_sparo", source="local", weights=exported)
    flags = eval_knn.build_parser().parse_args(["--pretrained_weights", exported])
    evaluated, options, _ = weights.load_backbone(flags)
    assert options["arch"] == "vit_tiny_sparo" and options["num_slots"] == 4
    for model in (by_file, by_folder, hub, evaluated):
        with torch.no_grad():
            close(model.eval()(images), expected)
    # timm's data config comes from the export: the model's input size, ImageNet mean and std
    data_config = timm.data.resolve_data_config(model=by_file)
    assert data_config["input_size"] == (3, 32, 32) and data_config["mean"] == (0.485, 0.456, 0.406)
    assert tuple(timm.data.resolve_data_config(model=by_folder)["input_size"]) == (3, 32, 32)


def test_the_student_exports_with_its_key(run_dir, tmp_path) -> None:
    checkpoint = os.path.join(run_dir, "checkpoint.pth")
    export_model.main(["--pretrained_weights", checkpoint, "--checkpoint_key", "student", "--output_dir",
                       str(tmp_path)])
    student = torch.hub.load(REPO, "vit_tiny_sparo", source="local", weights=checkpoint, checkpoint_key="student")
    images = images_batch()
    close(torch.hub.load(REPO, "vit_tiny_sparo", source="local", weights=str(tmp_path))(images), student(images))


def test_an_official_dino_checkpoint_exports(images, tmp_path) -> None:
    """Official main_dino.py's checkpoint format (argparse Namespace with a PosixPath, weight_g/weight_v head)."""
    from test_untrusted_checkpoints import official_training_checkpoint, save

    from sparo_dino.cli.train_flags import parse_train_args

    args = parse_train_args(["--arch", "vit_tiny", "--patch_size", "8", "--img_size", "32", "--out_dim", "64",
                             "--data_path", images, "--output_dir", str(tmp_path / "official")])
    state = official_training_checkpoint(args)
    path = save(state, str(tmp_path / "checkpoint.pth"), "numpy 1")
    export_model.main(["--pretrained_weights", path, "--output_dir", str(tmp_path / "export")])
    teacher = torch.hub.load(REPO, "vit_tiny", source="local", weights=path)
    images_in = images_batch()
    close(timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()(images_in),
          teacher(images_in))


def test_eval_knn_reads_the_folder_like_the_checkpoint(run_dir, exported, image_folder, tmp_path) -> None:
    """The same k-NN result from the export as from the checkpoint, and the random-init baseline from the run
    config the export keeps."""
    from_checkpoint = eval_knn.main(["--pretrained_weights", os.path.join(run_dir, "checkpoint.pth"), *EVAL,
                                     "--data_path", image_folder, "--init_baseline", "--output_dir", str(tmp_path)])
    from_export = eval_knn.main(["--pretrained_weights", exported, *EVAL, "--data_path", image_folder,
                                 "--init_baseline", "--output_dir", str(tmp_path)])
    assert from_export["knn"] == from_checkpoint["knn"]
    assert from_export["init_baseline"] == from_checkpoint["init_baseline"]


def test_the_model_card_says_what_how_trained_results_and_how_to_load(run_dir, image_folder, tmp_path) -> None:
    checkpoint = os.path.join(run_dir, "checkpoint.pth")
    knn = eval_knn.main(["--pretrained_weights", checkpoint, *EVAL, "--data_path", image_folder, "--init_baseline"])
    folder = str(tmp_path / "export")
    export_model.main(["--pretrained_weights", checkpoint, "--output_dir", folder])
    with open(os.path.join(folder, "README.md")) as handle:
        card = handle.read()
    assert card.startswith("---\nlicense: apache-2.0\nlibrary_name: timm\n")
    assert "# vit_tiny_sparo: a DINO backbone with the sparo read-out" in card
    assert "encoding has 32 dimensions (4 slots of 8)" in card and "after 1 epoch." in card
    assert "| epochs | 1 |" in card and "| out_dim | 64 |" in card
    top1, init = knn["knn"]["5"]["top1"], knn["init_baseline"]["5"]["top1"]
    assert f"| weighted 5-NN | {top1:.2f} | {init:.2f} |" in card
    assert "provenance.jsonl" in card
    assert 'timm.create_model("vit_tiny_sparo", pretrained=True,' in card


@pytest.mark.skipif(not HAS_ONNX, reason="onnx and onnxscript are not installed (pip install sparo-dino[export])")
def test_onnx_has_a_dynamic_batch_and_matches_eager(run_dir, teacher, tmp_path, capsys) -> None:
    exported = export_model.main(["--pretrained_weights", os.path.join(run_dir, "checkpoint.pth"), "--output_dir",
                                  str(tmp_path), "--format", "onnx"])
    assert os.path.isfile(tmp_path / "model.onnx")
    if importlib.util.find_spec("onnxruntime") is None:
        assert "model.onnx not checked: onnxruntime is not installed" in capsys.readouterr().out
        return
    import onnxruntime
    assert exported.onnx_max_error is not None and exported.onnx_max_error <= 1e-4
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    images = images_batch(batch=5)  # not the batch it was exported with
    (output,) = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(output), teacher(images), atol=1e-4, rtol=0)


def test_a_missing_optional_package_is_one_line(run_dir, tmp_path, monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(ValueError, match=r"^onnxscript not installed \(pip install onnxscript"):
        export_model.main(["--pretrained_weights", os.path.join(run_dir, "checkpoint.pth"), "--output_dir",
                           str(tmp_path / "out"), "--format", "onnx"])
    assert not os.path.exists(tmp_path / "out")


def test_torch_export_program_has_a_dynamic_batch(run_dir, teacher, tmp_path) -> None:
    export_model.main(["--pretrained_weights", os.path.join(run_dir, "checkpoint.pth"), "--output_dir",
                       str(tmp_path), "--format", "export"])
    program = torch.export.load(str(tmp_path / "model.pt2")).module()
    for batch in (1, 5):
        images = images_batch(batch=batch)
        with torch.no_grad():
            close(program(images), teacher(images))


def test_push_to_hub_uploads_the_folder_with_the_token(run_dir, tmp_path, monkeypatch, capsys) -> None:
    uploads = []

    def upload(folder: str, repo_id: str, token: str) -> str:  # stands in for huggingface_hub's upload
        uploads.append((sorted(os.listdir(folder)), repo_id, token))
        return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(export, "upload_folder", upload)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    folder = str(tmp_path / "export")
    export_model.main(["--pretrained_weights", os.path.join(run_dir, "checkpoint.pth"), "--output_dir", folder,
                       "--push_to_hub", "someone/vit_tiny_sparo_dino"])
    assert uploads == [(["README.md", "config.json", "model.safetensors"], "someone/vit_tiny_sparo_dino",
                        "hf_test_token")]
    assert "uploaded" in capsys.readouterr().out
    with open(os.path.join(folder, "README.md")) as handle:
        assert 'timm.create_model("hf-hub:someone/vit_tiny_sparo_dino", pretrained=True)' in handle.read()


def test_push_to_hub_without_a_token_stops_before_exporting(run_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no stored login either
    monkeypatch.setattr(export, "hub_token", lambda: None)
    with pytest.raises(ValueError, match="--push_to_hub needs a Hugging Face token"):
        export_model.main(["--pretrained_weights", os.path.join(run_dir, "checkpoint.pth"), "--output_dir",
                           str(tmp_path / "out"), "--push_to_hub", "someone/model"])
    assert not os.path.exists(tmp_path / "out")


def test_pretrained_true_names_what_to_give(tmp_path) -> None:
    with pytest.raises(ValueError, match="no pretrained weights are published for vit_small_sparo; name them"):
        timm.create_model("vit_small_sparo", pretrained=True)
    folder = str(tmp_path / "other")
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as handle:
        json.dump({"architecture": "vit_tiny_gap", "model_args": {}}, handle)
    torch.save({}, os.path.join(folder, "model.safetensors"))
    with pytest.raises(ValueError, match="holds a vit_tiny_gap backbone, not vit_tiny_sparo"):
        timm.create_model("vit_tiny_sparo", pretrained=True,
                          pretrained_cfg_overlay=dict(file=os.path.join(folder, "model.safetensors")))
    assert sparo_vit.readout_of("vit_tiny") == "cls" and timm.is_model("vit_tiny")  # cls archs are timm models too
    with pytest.raises(FileNotFoundError, match="without the config.json of an export_model.py export"):
        weights.read_weights(str(tmp_path))
