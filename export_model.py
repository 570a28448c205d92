"""Export a trained backbone for others to load: timm, torch.hub, the Hugging Face Hub, ONNX, torch.export.

    python export_model.py --pretrained_weights out/sparo_in1k/checkpoint.pth --output_dir export/sparo_in1k
    python export_model.py --pretrained_weights out/sparo_in1k/checkpoint.pth --output_dir export/sparo_in1k \
        --format onnx export --push_to_hub USER/vit_small_sparo_dino

Writes model.safetensors, config.json (timm's Hub layout: architecture, model options, input size, mean/std) and a
README.md model card built from the run's config, provenance and the evaluation results in the checkpoint's folder;
`--format onnx` adds model.onnx (dynamic batch; checked against eager with onnxruntime when installed), `--format
export` a torch.export program (model.pt2). docs/export.md shows how each is loaded back.
"""
from __future__ import annotations

import argparse
import os
from typing import Sequence

from sparo_dino.cli import config, eval_flags
from sparo_dino.cli.errors import require_writable_dirs
from sparo_dino.io import export


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    eval_flags.add_weight_args(parser)
    group = parser.add_argument_group("export")
    group.add_argument("--output_dir", type=str, required=True, help="the folder to write (timm's Hub layout)")
    group.add_argument("--format", type=str, nargs="+", default=["safetensors"], choices=export.FORMATS,
                       help="besides model.safetensors (always written): onnx = model.onnx, export = model.pt2")
    group.add_argument("--run_dir", type=str, default=None,
                       help="the training run's folder, for the model card (default: the checkpoint's folder)")
    group.add_argument("--push_to_hub", type=str, default=None, metavar="REPO_ID",
                       help="upload the folder to this Hugging Face model repository (needs huggingface_hub and a "
                            "token: HF_TOKEN or `huggingface-cli login`)")
    return parser


def main(argv: Sequence[str] | None = None) -> export.Exported:
    args = config.parse_args(build_parser(), argv)
    if args.pretrained_weights is None:
        raise ValueError("--pretrained_weights is required: a training checkpoint, export folder or state dict")
    missing = export.missing_packages(args.format, args.push_to_hub is not None)
    if missing:
        raise ValueError(f"{', '.join(missing)} not installed (pip install {' '.join(missing)}, or the extra "
                         "sparo-dino[export])")
    token = export.require_hub_token() if args.push_to_hub else None
    require_writable_dirs({"--output_dir": args.output_dir})
    exported = export.export_backbone(args.pretrained_weights, args.output_dir, vars(args), args.checkpoint_key,
                                      args.format, args.run_dir, args.push_to_hub)
    for path in exported.files:
        print(f"wrote {path}", flush=True)
    if exported.onnx_max_error is not None:
        print(f"{export.ONNX_NAME} under onnxruntime: max |difference| to eager {exported.onnx_max_error:.2e}",
              flush=True)
    elif "onnx" in args.format:
        print(f"{export.ONNX_NAME} not checked: onnxruntime is not installed", flush=True)
    if args.push_to_hub:
        print(f"uploaded {os.path.abspath(args.output_dir)} to {args.push_to_hub}: "
              f"{export.push_to_hub(args.output_dir, args.push_to_hub, token)}", flush=True)
    return exported


if __name__ == "__main__":
    eval_flags.run_cli(main)
