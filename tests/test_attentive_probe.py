"""eval_linear.py --probe attentive: one cross-attention pooling layer plus a linear classifier on all final-norm
tokens of the frozen trunk, cached like the linear probe's features, with the same lr choice on a train hold-out,
random-init baseline, shifted test sets and few-shot draws."""
from __future__ import annotations

import json
import re

import pytest
import torch
from test_eval_knn import SMALL_IMAGES, trained_sparo_run

import eval_linear
from sparo_dino.data import augmentation
from sparo_dino.eval import extraction, linear_probe
from sparo_dino.eval.feature_cache import load_features
from sparo_dino.io import weights

SUMMARY = re.compile(r"^Attentive probe result \[(FAST MODE[^\]]*)\]: best Top1: [\d.]+ .*final Top1: ([\d.]+)", re.M)
TOKENS = 1 + (32 // 8) ** 2  # CLS and the 4 x 4 patches of a 32 px crop at patch 8
WIDTH = 192  # vit_tiny


def test_the_attentive_head_pools_tokens_without_regard_to_their_order() -> None:
    """Attention pooling with a learned query and no position embedding is invariant to the token order: true only
    if each cached row is read back as (tokens, embed_dim), not with the two axes mixed up."""
    torch.manual_seed(0)
    head = linear_probe.AttentiveClassifier(WIDTH, TOKENS, 5).eval()
    tokens = torch.randn(3, TOKENS, WIDTH)
    shuffled = tokens[:, torch.randperm(TOKENS)]
    with torch.no_grad():
        torch.testing.assert_close(head(shuffled.flatten(1)), head(tokens.flatten(1)), atol=1e-5, rtol=0)
        assert head(tokens.flatten(1)).shape == (3, 5)
        assert not torch.allclose(head(tokens.flatten(1)), head(tokens.transpose(1, 2).flatten(1)), atol=1e-3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[str, str]:
    from conftest import make_image_folder

    root = tmp_path_factory.mktemp("attentive")
    images = make_image_folder(root / "data", splits=("train", "val"))
    return trained_sparo_run(images, root / "run"), images


def test_attentive_probe_learns_beside_its_random_init_with_test_sets_and_few_shot(checkpoint, tmp_path, capsys):
    path, images = checkpoint
    cache = str(tmp_path / "cache")
    results = eval_linear.main(["--pretrained_weights", path, "--data_path", images, *SMALL_IMAGES, "--fast",
                                "--probe", "attentive", "--epochs", "10", "--lr_grid", "0.3", "3",
                                "--holdout_fraction", "0.25", "--init_baseline", "--n_per_class", "2",
                                "--fewshot_tries", "2", "--test_sets", f"shifted={images}/val",
                                "--dump_features", cache, "--output_dir", str(tmp_path / "probe")])
    out = capsys.readouterr().out
    protocol, top1 = SUMMARY.search(out).groups()
    assert "no augmentation" in protocol and float(top1) == results["final"]["top1"] >= 80.0
    assert results["run"]["kind"] == extraction.TOKENS_KIND and results["run"]["dim"] == TOKENS * WIDTH
    assert results["run"]["probe"] == "attentive" and len(results["lr_grid"]["lrs"]) == 2
    assert "Attentive probe at random init (same arch, seed and images)" in out
    assert results["init_baseline"]["run"]["at_init"] is True
    table = {(row["set"], row["train"]): row["top1"] for row in results["table"]}
    assert set(table[("val", "all")]) == {"attentive", "attentive at init"}
    assert ("shifted", "2/class") in table and "attentive probe [fast], final head" in out
    saved = json.loads((tmp_path / "probe" / "results_linear.json").read_text())
    assert saved["final"] == results["final"]
    # the cache holds every final-norm token of the teacher's trunk, CLS first
    cached = load_features(cache)
    backbone, _, _ = weights.load_backbone(eval_linear.build_parser().parse_args(["--pretrained_weights", path]))
    view = augmentation.eval_transform(32, 32)
    _, val = extraction.build_splits("imagefolder", images, view, view)
    with torch.no_grad():
        expected = backbone.tokens(torch.stack([val[index][0] for index in range(2)]))
    assert cached.meta["kind"] == "tokens" and backbone.readout == "sparo"
    torch.testing.assert_close(cached.val_features[:2].reshape(2, TOKENS, WIDTH), expected)
    # the cached rows reload into the same probe (and a linear probe refuses them: other features)
    again = eval_linear.main(["--load_features", cache, "--fast", "--probe", "attentive", "--epochs", "10",
                              "--lr_grid", "0.3", "3", "--holdout_fraction", "0.25", "--batch_size_per_gpu", "8",
                              "--output_dir", str(tmp_path / "again")])
    assert again["final"] == results["final"]
    with pytest.raises(ValueError, match="features in .* are 'tokens', this evaluation needs 'sparo_encoding'"):
        eval_linear.main(["--load_features", cache, "--fast", "--output_dir", str(tmp_path / "linear")])


@pytest.mark.parametrize("flags", [[], ["--fast", "--n_last_blocks", "2"], ["--fast", "--sparo_features",
                                                                           "encoding+cls"]])
def test_attentive_probe_needs_fast_and_all_tokens(flags, tmp_path) -> None:
    with pytest.raises(ValueError, match="--probe attentive trains on cached tokens"):
        eval_linear.main(["--pretrained_weights", "x", "--data_path", str(tmp_path), "--probe", "attentive", *flags])
