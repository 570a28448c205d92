"""Evaluation memory at ImageNet scale, checked on CPU: what extraction leaves behind is released before the search."""
from __future__ import annotations

import gc
import weakref

import torch

from sparo_dino import features
from test_eval_knn import SMALL_IMAGES, write_checkpoint
from test_features import SPARO_TINY


def test_cached_device_memory_is_released_once_the_backbone_is_gone(image_folder, tmp_path, monkeypatch):
    """torch's CUDA cache keeps the extraction's activation blocks; they go back (empty_cache) after the backbone
    is dropped, so the k-NN bank and faiss-gpu, which allocates outside torch's cache, can have them."""
    import eval_knn

    backbones, alive_at_release = [], []
    real_load_backbone = features.load_backbone

    def spied_load_backbone(*args, **kwargs):
        backbone, options, tag = real_load_backbone(*args, **kwargs)
        backbones.append(weakref.ref(backbone))
        return backbone, options, tag

    def spied_empty_cache():
        gc.collect()
        alive_at_release.append(backbones[-1]() is not None)

    monkeypatch.setattr(features, "load_backbone", spied_load_backbone)
    monkeypatch.setattr(torch.cuda, "empty_cache", spied_empty_cache)
    checkpoint = write_checkpoint(tmp_path / "run", SPARO_TINY)
    args = eval_knn.build_parser().parse_args(["--pretrained_weights", checkpoint, "--data_path", image_folder,
                                               *SMALL_IMAGES])
    data = features.compute_features(args, torch.device("cpu"))
    assert data is not None and len(data.train_features) == 24
    assert alive_at_release == [False]
