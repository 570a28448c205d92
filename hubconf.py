"""torch.hub entry points: one per backbone arch of sparo_vit, built from a local checkpoint or fresh.

    backbone = torch.hub.load("/path/to/this/repo", "vit_small_sparo", source="local", weights="run/checkpoint.pth")
    student = torch.hub.load(REPO, "vit_small_sparo", source="local", weights="run/checkpoint.pth",
                             checkpoint_key="student")
    exported = torch.hub.load(REPO, "vit_small_sparo", source="local", weights="export/DIR")  # export_model.py
    fresh = torch.hub.load(REPO, "vit_small_sparo", source="local", num_slots=32)  # weights=None: random init

A training checkpoint is read through the evaluation scripts' loader (sparo_dino.io.weights), so the backbone is
built from the checkpoint's own `config` (patch size, img_size, SPARO sizes) exactly as eval_knn.py builds it, and
the weights load strictly; a folder written by export_model.py (`weights="export/DIR"`) is read through its
config.json the same way. Plain backbone state dicts (such as official DINO's published ViT weights) work too;
their patch size is 16 unless `patch_size=` says otherwise. No weights are published for this repository, so no
entry point ever downloads anything: `pretrained=True` without `weights=` is an error. The file is read with
weights_only=True (official DINO checkpoints through sparo_dino.io.checkpoint's allow-list), so a crafted `weights=`
file cannot run code.
"""
from typing import Any as _Any

import sparo_vit as _sparo_vit
from sparo_dino.io import weights as _weights

dependencies = ["torch", "torchvision", "timm"]

_PLAIN_PATCH_SIZE = 16  # build_backbone's default, and the patch size of official DINO's ViT-S/16 and ViT-B/16


def _load(arch: str, pretrained: bool, weights: str | None, checkpoint_key: str,
          options: dict[str, _Any]) -> _sparo_vit.DinoVisionTransformer:
    """The backbone of `arch`: fresh with `options` when weights is None, else built and loaded from the file."""
    if weights is None:
        if pretrained:
            raise ValueError(f"no pretrained weights are published for {arch} and nothing is downloaded; "
                             "pass weights='path/to/checkpoint.pth'")
        return _sparo_vit.build_backbone(arch, **options)
    unknown = sorted(set(options) - set(_weights.BACKBONE_OPTION_KEYS))
    if unknown:
        raise TypeError(f"{', '.join(unknown)} cannot be set when loading weights; the model options are "
                        f"{', '.join(key for key in _weights.BACKBONE_OPTION_KEYS if key != 'arch')}")
    loaded = _weights.read_weights(weights, checkpoint_key)
    stored_arch = (loaded.config or {}).get("arch")
    if stored_arch is not None and stored_arch != arch:
        raise ValueError(f"{weights} holds a {stored_arch} backbone; load it with the {stored_arch!r} entry point")
    flags = {key: options.get(key) for key in _weights.BACKBONE_OPTION_KEYS}
    flags["arch"] = arch
    if loaded.config is None and flags["patch_size"] is None:
        flags["patch_size"] = _PLAIN_PATCH_SIZE
    model_options = _weights.resolve_model_options(flags, loaded.config)
    backbone = _weights.build_frozen_backbone(model_options, loaded.state_dict, weights)
    return backbone.requires_grad_(True)  # frozen for evaluation there; a hub user may fine-tune


def _entry_point(arch: str):
    def entry(pretrained: bool = False, weights: str | None = None, checkpoint_key: str = "teacher",
              **options: _Any) -> _sparo_vit.DinoVisionTransformer:
        return _load(arch, pretrained, weights, checkpoint_key, options)

    entry.__name__ = entry.__qualname__ = arch
    entry.__doc__ = (f"{arch} backbone (eval mode, trainable parameters). weights: a training checkpoint of this "
                     "repository (checkpoint_key 'teacher' or 'student'; its config sets the model) or a plain "
                     "state dict; None builds a fresh backbone from the options (see sparo_vit.build_backbone).")
    return entry


for _arch in _sparo_vit.ARCHS:
    globals()[_arch] = _entry_point(_arch)
