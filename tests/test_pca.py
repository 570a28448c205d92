"""--pca_dim, the width control of both evaluations: the components against an SVD written here, fitted on the train
split only, applied to every split, and refused where it cannot mean what it says."""
from __future__ import annotations

import pytest
import torch

import eval_knn
import eval_linear
from sparo_dino.eval import pca
from sparo_dino.eval.feature_cache import FeatureSet, save_features
from sparo_dino.eval.knn import topk_accuracy, weighted_knn

OPTIONS = {"arch": "vit_tiny", "patch_size": 8, "img_size": 32}


def reference_pca(train: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Right singular vectors of the centred train features: mean, (D, dim) directions, variance share kept."""
    data = train.double()
    mean = data.mean(dim=0)
    _, singular, vh = torch.linalg.svd(data - mean, full_matrices=False)
    return mean, vh[:dim].T, (singular[:dim] ** 2).sum().item() / (singular ** 2).sum().item()


def anisotropic(n: int, gen: torch.Generator, dim: int = 12) -> torch.Tensor:
    """Features whose variance falls off by direction (distinct eigenvalues, so the directions are defined), in a
    random rotation and off the origin."""
    rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen))
    scales = torch.linspace(4.0, 0.2, dim)
    return (torch.randn(n, dim, generator=gen) * scales) @ rotation.T + 3.0


def test_components_match_an_svd_up_to_sign() -> None:
    gen = torch.Generator().manual_seed(0)
    train = anisotropic(200, gen)
    fitted = pca.fit(train, 5)
    mean, directions, explained = reference_pca(train, 5)
    torch.testing.assert_close(fitted.mean, mean)
    signs = torch.sign((fitted.components * directions).sum(dim=0))  # each direction is defined up to its sign
    torch.testing.assert_close(fitted.components * signs, directions, atol=1e-8, rtol=1e-6)
    assert fitted.explained == pytest.approx(explained, rel=1e-10)
    queries = anisotropic(7, gen)
    torch.testing.assert_close(fitted.project(queries) * signs.float(),
                               ((queries.double() - mean) @ directions).float())
    assert fitted.project(queries).dtype == torch.float32
    # all directions: a rotation of the centred features, which keeps their distances
    full = pca.fit(train, 12).project(train)
    assert pca.fit(train, 12).explained == pytest.approx(1.0)
    torch.testing.assert_close(torch.cdist(full.double(), full.double()), torch.cdist(train.double(), train.double()),
                               atol=1e-4, rtol=1e-5)


def test_sizes_it_cannot_take() -> None:
    with pytest.raises(ValueError, match="--pca_dim 13 must be between 1 and the features' width \\(12\\)"):
        pca.fit(torch.randn(20, 12), 13)
    with pytest.raises(ValueError, match="--pca_dim 0 must be"):
        pca.fit(torch.randn(20, 12), 0)
    with pytest.raises(ValueError, match="needs \\(N, D\\) features"):
        pca.fit(torch.randn(20), 1)


def cached(folder, gen: torch.Generator) -> tuple[str, FeatureSet]:
    """3 classes in 12 dims, with a val split far off the train distribution: a PCA fitted on val (or on both) would
    point elsewhere than one fitted on train."""
    labels = torch.arange(90) % 3
    train = anisotropic(90, gen) + torch.nn.functional.one_hot(labels, 12).float() * 6
    val_labels = torch.arange(30) % 3
    val = anisotropic(30, gen) + torch.nn.functional.one_hot(val_labels, 12).float() * 6
    val[:, -1] += 50.0 * torch.randn(30, generator=gen)  # a direction the train split barely varies in
    features = FeatureSet(train, labels, val, val_labels, ["a", "b", "c"], {"kind": "cls_last1", "options": OPTIONS,
                                                                            "tag": "cached"})
    save_features(features, str(folder))
    return str(folder), features


def test_knn_reads_the_train_fitted_components_of_every_split(tmp_path) -> None:
    folder, features = cached(tmp_path / "cache", torch.Generator().manual_seed(1))
    results = eval_knn.main(["--load_features", folder, "--pca_dim", "3", "--nb_knn", "5", "--use_cuda", "false",
                             "--output_dir", str(tmp_path / "knn")])
    mean, directions, explained = reference_pca(features.train_features, 3)
    train, val = (((x.double() - mean) @ directions).float() for x in (features.train_features, features.val_features))
    expected = topk_accuracy(weighted_knn(train, features.train_labels, val, 3, k=5, temperature=0.07),
                             features.val_labels)
    assert (results["knn"]["5"]["top1"], results["knn"]["5"]["top5"]) == pytest.approx(expected)
    assert results["meta"]["pca"] == {"dim": 3, "fitted_on": "train", "explained_variance": pytest.approx(explained)}
    # fitted on train and val together the components would follow val's far-off direction: another result
    both = torch.cat([features.train_features, features.val_features])
    mean_all, directions_all, _ = reference_pca(both, 3)
    assert directions_all[-1].abs().max() > 0.9 and directions[-1].abs().max() < 0.5


def test_linear_probe_trains_on_the_components(tmp_path) -> None:
    folder, _ = cached(tmp_path / "cache", torch.Generator().manual_seed(2))
    results = eval_linear.main(["--load_features", folder, "--fast", "--n_last_blocks", "1", "--pca_dim", "4",
                                "--epochs", "2", "--lr_grid", "0.1", "1", "--output_dir", str(tmp_path / "probe")])
    assert results["run"]["dim"] == 4


def test_flags_it_cannot_go_with(tmp_path) -> None:
    folder, _ = cached(tmp_path / "cache", torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="--pca_dim cannot go with the official protocol"):
        eval_linear.main(["--pretrained_weights", str(tmp_path / "run.pth"), "--pca_dim", "4",
                          "--output_dir", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="--pca_dim cannot go with --probe attentive: it reads tokens"):
        eval_linear.main(["--pretrained_weights", str(tmp_path / "run.pth"), "--fast", "--probe", "attentive",
                          "--pca_dim", "4", "--output_dir", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="--pca_dim cannot go with --per_slot/--select_slots: principal components "
                                         "mix the slots"):
        eval_knn.main(["--load_features", folder, "--pca_dim", "4", "--per_slot", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="--pca_dim must be >= 1, got 0"):
        eval_knn.main(["--load_features", folder, "--pca_dim", "0", "--output_dir", str(tmp_path)])
