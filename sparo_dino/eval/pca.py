"""PCA of extracted features, fitted on the train split only: the width control of `--pca_dim`.

A 4096-wide slot encoding and a 192-wide CLS token differ in width as well as in what they learned; evaluating both
at the same number of principal components (fitted without the test images) separates the two without retraining.
The components come from the eigendecomposition of the train features' covariance in float64: it needs D x D
memory whatever the number of images, where an SVD of the centred features would need the whole N x D matrix twice.
"""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class PCA:
    """The train mean (D,), the first `dim` principal directions as columns (D, dim), largest variance first, and
    the share of the train variance they hold."""
    mean: torch.Tensor
    components: torch.Tensor
    explained: float

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, dim): centred on the train mean, projected, in the features' dtype."""
        return ((features.double() - self.mean) @ self.components).to(features.dtype)


def fit(train: torch.Tensor, dim: int) -> PCA:
    """The first `dim` principal components of (N, D) train features; dim may equal D (a rotation of the centred
    features), not exceed it or the number of images."""
    if train.ndim != 2:
        raise ValueError(f"PCA needs (N, D) features, got shape {tuple(train.shape)}")
    if not 1 <= dim <= min(train.shape):
        raise ValueError(f"--pca_dim {dim} must be between 1 and the features' width ({train.shape[1]}) and number "
                         f"of train images ({train.shape[0]})")
    data = train.double()
    mean = data.mean(dim=0)
    centred = data - mean
    covariance = centred.T @ centred / max(len(data) - 1, 1)
    variances, vectors = torch.linalg.eigh(covariance)  # ascending
    order = variances.flip(0)[:dim]
    total = variances.clamp(min=0).sum().item()
    explained = order.clamp(min=0).sum().item() / total if total > 0 else 1.0
    return PCA(mean, vectors.flip(1)[:, :dim].contiguous(), explained)
