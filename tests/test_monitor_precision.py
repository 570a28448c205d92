"""The training k-NN monitor extracts features in eval_knn.py's precision (fp32), whatever the trainer's autocast:
under --precision bf16 it would otherwise report a number eval_knn.py does not give for the same teacher."""
from __future__ import annotations

import torch
from conftest import make_image_folder
from test_train import assert_monitor_matches_eval_knn, run

from sparo_dino.eval import extraction


def test_monitor_under_bf16_training_extracts_in_fp32_and_matches_eval_knn(images, tmp_path, monkeypatch):
    computed_in = []
    real_feature_function = extraction.feature_function

    def spied_feature_function(backbone, kind):
        """The dtype every linear layer of the backbone computes in (the final LayerNorm's output is fp32 under
        autocast too, so the features' dtype alone would not tell)."""
        compute = real_feature_function(backbone, kind)
        dtypes = []
        for module in backbone.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))

        def spied(batch):  # records the monitor's forward passes only, not the training steps'
            dtypes.clear()
            out = compute(batch)
            computed_in.extend(dtypes)
            return out

        return spied

    monkeypatch.setattr(extraction, "feature_function", spied_feature_function)
    labelled = make_image_folder(tmp_path / "labelled", num_classes=3, per_class=6, size=32, splits=("train", "val"))
    out = str(tmp_path / "run")
    assert run(images, out, "--epochs", "1", "--precision", "bf16", "--knn_every", "1", "--knn_data_path", labelled,
               "--knn_subset", "100").code == 0
    assert computed_in and set(computed_in) == {torch.float32}, computed_in
    assert_monitor_matches_eval_knn(out, labelled, resize_size=37, crop_size=32, eval_dir=tmp_path / "eval")
