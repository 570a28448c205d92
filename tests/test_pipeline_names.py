"""--augmentation names the pipelines for how they make crops (per_image in the loader workers, batched on the
training device), since both run on any device; the older names cpu / gpu stay accepted and mean the same."""
from __future__ import annotations

import pytest
import torch

from sparo_dino.cli.train_flags import parse_train_args
from sparo_dino.data.loader import resolve_augmentation

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


def test_auto_is_batched_on_cuda_and_per_image_elsewhere() -> None:
    assert resolve_augmentation("auto", CUDA) == "batched"
    assert resolve_augmentation("auto", CPU) == "per_image"


@pytest.mark.parametrize("given,meant", [("per_image", "per_image"), ("batched", "batched"), ("cpu", "per_image"),
                                         ("gpu", "batched")])
def test_old_names_are_aliases_of_the_new_on_any_device(given: str, meant: str) -> None:
    assert resolve_augmentation(given, CPU) == meant and resolve_augmentation(given, CUDA) == meant
    assert parse_train_args(["--data_path", "x", "--augmentation", given]).augmentation == meant  # resolved config


def test_an_unknown_pipeline_is_one_line_naming_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown augmentation 'fast'; choose from auto, per_image, batched") as error:
        resolve_augmentation("fast", CPU)
    assert "\n" not in str(error.value)
