"""A trained backbone in the forms others load: a folder that timm, torch.hub and the Hugging Face Hub read
(model.safetensors, config.json, a README.md model card), and optionally ONNX and a torch.export program.

The folder follows timm's Hub layout: config.json holds `architecture`, `model_args` (the backbone options) and
`pretrained_cfg` (input size, mean and std), so `timm.create_model("local-dir:DIR", pretrained=True)` and, once
uploaded, `timm.create_model("hf-hub:USER/NAME", pretrained=True)` rebuild the backbone after `import sparo_vit`; its
`sparo_dino` entry keeps the training run's flags, so the evaluations can still rebuild the random-init baseline
from an export. export_model.py is the command line; docs/export.md the guide.
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

import sparo_vit
from sparo_dino.data.augmentation import EVAL_RESIZE_RATIO, IMAGENET_MEAN, IMAGENET_STD
from sparo_dino.io import weights
from sparo_dino.io.provenance import PROVENANCE_NAME

FORMATS: tuple[str, ...] = ("safetensors", "onnx", "export")
CARD_NAME = "README.md"
ONNX_NAME = "model.onnx"
PROGRAM_NAME = "model.pt2"
ONNX_TOLERANCE = 1e-4  # max |onnxruntime - eager| accepted on the check batch
# What each optional format needs (pyproject extra `export`): the ONNX exporter of torch >= 2.5 is onnxscript's.
FORMAT_PACKAGES: Mapping[str, tuple[str, ...]] = {"onnx": ("onnx", "onnxscript")}
LICENSE = "apache-2.0"  # this repository's (LICENSE); the card tells users to check their data's too


@dataclass
class Exported:
    """What export_backbone built and wrote: the frozen backbone, its build options, the files."""
    backbone: nn.Module
    options: dict[str, Any]
    files: list[str]
    onnx_max_error: float | None = None  # onnxruntime against eager, when onnxruntime is installed


def missing_packages(formats: Sequence[str], push_to_hub: bool) -> list[str]:
    """The packages the requested formats (and an upload) need that are not installed."""
    needed = [package for name in formats for package in FORMAT_PACKAGES.get(name, ())]
    if push_to_hub:
        needed.append("huggingface_hub")
    return [package for package in dict.fromkeys(needed) if importlib.util.find_spec(package) is None]


def model_config(options: Mapping[str, Any], num_features: int, run_config: Mapping[str, Any] | None,
                 checkpoint_key: str, source: str, epoch: int | None) -> dict[str, Any]:
    """config.json in timm's Hub format, plus this repository's record of where the weights came from."""
    model_args = {key: value for key, value in options.items() if key != "arch"}
    size = int(options.get("img_size", 224))
    return {
        "architecture": options["arch"],
        "num_classes": 0,
        "num_features": num_features,
        "model_args": model_args,
        "pretrained_cfg": {"input_size": [3, size, size], "interpolation": "bicubic",
                           "crop_pct": round(1 / EVAL_RESIZE_RATIO, 4), "crop_mode": "center",
                           "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "num_classes": 0,
                           "license": LICENSE, "paper_ids": "arXiv:2404.15721"},
        "sparo_dino": {"checkpoint_key": checkpoint_key, "source": os.path.basename(source), "epoch": epoch,
                       "run_config": dict(run_config) if run_config else None},
    }


def _read_json_lines(path: str) -> list[dict[str, Any]]:
    if not os.path.isfile(path):
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _read_json(path: str) -> dict[str, Any] | None:
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def run_results(run_dir: str, tag: str) -> list[str]:
    """Markdown rows of the evaluations saved in the run folder for these weights (eval_knn.py's knn_<tag>.json,
    eval_linear.py's linear*_<tag>/results_linear.json), each beside its random-init baseline when it has one."""
    rows = []
    knn = _read_json(os.path.join(run_dir, f"knn_{tag}.json"))
    if knn is not None:
        for k, accuracy in knn["knn"].items():
            init = knn.get("init_baseline", {}).get(k, {}).get("top1")
            rows.append(f"| weighted {k}-NN | {accuracy['top1']:.2f} | {'-' if init is None else f'{init:.2f}'} |")
    for folder in ("linear", "linear_fast", "attentive_fast"):
        linear = _read_json(os.path.join(run_dir, f"{folder}_{tag}", "results_linear.json"))
        if linear is None:
            continue
        init = (linear.get("init_baseline") or {}).get("final", {}).get("top1")
        what = {"linear": "linear probe (official protocol)", "linear_fast": "linear probe (fast: cached features)",
                "attentive_fast": "attentive probe (cached tokens)"}[folder]
        rows.append(f"| {what} | {linear['final']['top1']:.2f} | {'-' if init is None else f'{init:.2f}'} |")
    return rows


def model_card(config: Mapping[str, Any], run_dir: str, tag: str, repo_id: str | None) -> str:
    """README.md of the export: what the model is, how it was trained (run config and provenance), its results in
    the run folder, how to load it, license."""
    arch, args = config["architecture"], config["model_args"]
    run = config["sparo_dino"]["run_config"] or {}
    provenance = _read_json_lines(os.path.join(run_dir, PROVENANCE_NAME))
    readout = sparo_vit.readout_of(arch)
    name, epoch = repo_id or "DIR", config["sparo_dino"]["epoch"]
    lines = ["---", f"license: {LICENSE}", "library_name: timm", "pipeline_tag: image-feature-extraction",
             "tags: [image-feature-extraction, self-supervised, dino, sparo, timm]", "---", "",
             f"# {arch}: a DINO backbone with the {readout} read-out", "",
             "A ViT trained with DINO self-supervision (no labels) by sparo-dino, DINO with SPARO read-outs; its "
             "encoding has "
             f"{config['num_features']} dimensions"
             + (f" ({args.get('num_slots')} slots of {args.get('slot_dim')})" if sparo_vit.has_slots(arch) else "")
             + f". These are the {config['sparo_dino']['checkpoint_key']} network's weights of "
             f"`{config['sparo_dino']['source']}`"
             + (f" after {epoch} epoch{'s' * (epoch != 1)}" if epoch is not None else "")
             + ". Input: RGB normalized with ImageNet mean and std, "
             f"{config['pretrained_cfg']['input_size'][1]} px (other sizes the patch divides work too).", ""]
    lines += ["## Training", ""]
    if run:
        facts = {"data": f"{run['dataset']} at `{run.get('data_path')}`" if run.get("dataset") else None,
                 "epochs": run.get("epochs"), "batch size per process": run.get("batch_size_per_gpu"),
                 "lr (per 256 images)": run.get("lr"), "optimizer": run.get("optimizer"),
                 "teacher temperature": run.get("teacher_temp"), "out_dim": run.get("out_dim"),
                 "pretrained trunk": run.get("pretrained_trunk"), "seed": run.get("seed")}
        lines += ["| setting | value |", "| --- | --- |"]
        lines += [f"| {key} | {value} |" for key, value in facts.items() if value is not None]
    else:
        lines.append("The weights came without their training run's config.")
    if provenance:
        first, last = provenance[0], provenance[-1]
        commit = (first.get("git") or {}).get("commit")
        lines += ["", f"Started {first.get('time')} with torch {first.get('packages', {}).get('torch')} on "
                  f"{first.get('world_size')} process(es), {first.get('precision')}"
                  + (f", code commit {commit}" if commit else "")
                  + (f"; {len(provenance)} launches, the last {last.get('time')}" if len(provenance) > 1 else "")
                  + " (the run's provenance.jsonl)."]
    results = run_results(run_dir, tag)
    lines += ["", "## Results", ""]
    if results:
        lines += ["Top-1 (%) on the run's evaluation data, beside the same network at its random init:", "",
                  "| evaluation | top-1 | at random init |", "| --- | --- | --- |", *results]
    else:
        lines.append("No evaluation results were found next to the checkpoint (eval_knn.py, eval_linear.py).")
    hub_name = f"hf-hub:{repo_id}" if repo_id else "local-dir:DIR"
    lines += ["", "## Use", "", "```python", "import timm, sparo_vit  # sparo_vit registers the archs with timm",
              f"model = timm.create_model(\"{hub_name}\", pretrained=True).eval()",
              f"model = timm.create_model(\"{arch}\", pretrained=True,",
              f"                          pretrained_cfg_overlay=dict(file=\"{name}/model.safetensors\"))",
              f"model = torch.hub.load(\"path/to/sparo-dino\", \"{arch}\", source=\"local\", weights=\"{name}\")",
              "```", "", f"Evaluations: `python eval_knn.py --pretrained_weights {name} --data_path ...`.", "",
              "## License", "",
              "Apache 2.0, as the code. The license of the training images may add terms of its own.", "",
              "## Citation", "", "SPARO: Vani et al., arXiv:2404.15721, 2024. DINO: Caron et al., ICCV 2021.", ""]
    return "\n".join(lines)


def check_batch(options: Mapping[str, Any], batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A fixed random batch at the model's image size, for checking exported forms against eager."""
    size = int(options.get("img_size", 224))
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def export_onnx(backbone: nn.Module, path: str, example: torch.Tensor) -> None:
    """model.onnx with a dynamic batch dimension (input `images`, output `encoding`)."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(backbone, (example,), dynamo=True, input_names=["images"],
                                output_names=["encoding"], dynamic_shapes={"images": {0: batch}})
    program.save(path)


def onnx_max_error(path: str, backbone: nn.Module, example: torch.Tensor) -> float | None:
    """max |onnxruntime - eager| on `example` (CPU), or None when onnxruntime is not installed."""
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {"images": example.numpy()})
    with torch.no_grad():
        return float((torch.from_numpy(output) - backbone(example)).abs().max())


def export_program(backbone: nn.Module, path: str, example: torch.Tensor) -> None:
    """model.pt2: a torch.export program with a dynamic batch dimension (torch.export.load(path).module())."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.export.save(torch.export.export(backbone, (example,), dynamic_shapes={"images": {0: batch}}), path)


def export_backbone(weights_path: str, output_dir: str, flags: Mapping[str, Any], checkpoint_key: str = "teacher",
                    formats: Sequence[str] = ("safetensors",), run_dir: str | None = None,
                    repo_id: str | None = None) -> Exported:
    """Write the backbone of `weights_path` (any file read_weights reads; `flags` fill what a plain state dict
    does not say) to `output_dir`: model.safetensors, config.json, README.md, and the optional `formats`."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown export format(s) {', '.join(unknown)}; valid: {', '.join(FORMATS)}")
    loaded = weights.read_weights(weights_path, checkpoint_key)
    options = weights.resolve_model_options(flags, loaded.config)
    backbone = weights.build_frozen_backbone(options, loaded.state_dict, weights_path)
    os.makedirs(output_dir, exist_ok=True)
    from safetensors.torch import save_file  # timm's dependency

    files = [os.path.join(output_dir, name) for name in (weights.EXPORT_WEIGHTS_NAME, weights.EXPORT_CONFIG_NAME,
                                                         CARD_NAME)]
    save_file({key: value.contiguous() for key, value in backbone.state_dict().items()}, files[0],
              metadata={"format": "pt"})
    config = model_config(options, backbone.num_features, loaded.config, checkpoint_key, weights_path, loaded.epoch)
    with open(files[1], "w") as handle:  # default=str: an official DINO config holds a PosixPath
        json.dump(config, handle, indent=2, default=str)
    with open(files[2], "w") as handle:
        handle.write(model_card(config, run_dir or os.path.dirname(os.path.abspath(weights_path)), loaded.tag,
                                repo_id))
    exported = Exported(backbone, options, files)
    example = check_batch(options)
    if "onnx" in formats:
        exported.files.append(os.path.join(output_dir, ONNX_NAME))
        export_onnx(backbone, exported.files[-1], example)
        exported.onnx_max_error = onnx_max_error(exported.files[-1], backbone, example)
        if exported.onnx_max_error is not None and exported.onnx_max_error > ONNX_TOLERANCE:
            raise ValueError(f"{exported.files[-1]} differs from the eager backbone by {exported.onnx_max_error:.2e} "
                             f"(more than {ONNX_TOLERANCE:g}) under onnxruntime")
    if "export" in formats:
        exported.files.append(os.path.join(output_dir, PROGRAM_NAME))
        export_program(backbone, exported.files[-1], example)
    return exported


def hub_token() -> str | None:
    """The Hugging Face token huggingface_hub finds (HF_TOKEN or `huggingface-cli login`), None without one."""
    import huggingface_hub

    return huggingface_hub.get_token()


def upload_folder(folder: str, repo_id: str, token: str) -> str:
    """Create the model repository if needed and upload the folder; returns the commit's URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                               commit_message="Upload a sparo-dino backbone (export_model.py)")
    return str(getattr(commit, "commit_url", commit))


def require_hub_token() -> str:
    """The token --push_to_hub uploads with; checked before exporting, so a missing one costs no export."""
    token = hub_token()
    if token is None:
        raise ValueError("--push_to_hub needs a Hugging Face token: set HF_TOKEN or run `huggingface-cli login`")
    return token


def push_to_hub(folder: str, repo_id: str, token: str) -> str:
    """Upload an export folder to the Hub as `repo_id` (through upload_folder); returns the commit's URL."""
    return upload_folder(folder, repo_id, token)
