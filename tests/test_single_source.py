"""Facts that used to be written in several places now have one definition that every user reads.

Each test changes or inspects the one definition and checks that the other users follow it, so a second copy
creeping back in fails here instead of drifting silently.
"""
from __future__ import annotations

import inspect

import sparo_vit
from sparo_dino.cli import train_flags


def test_sparo_defaults_have_one_definition_read_by_the_module_the_builder_and_the_flags() -> None:
    defaults = sparo_vit.SPARO_DEFAULTS
    assert dict(defaults) == {"num_slots": 64, "slot_dim": 64, "attn_dim": 64, "group_size": 1}
    signature = inspect.signature(sparo_vit.SPARO)
    assert {name: signature.parameters[name].default for name in defaults} == dict(defaults)
    assert sparo_vit.READOUT_OPTIONS == (*defaults, "slot_norm")
    assert {name: signature.parameters[name].default for name in sparo_vit.READOUT_OPTIONS} == \
        dict(sparo_vit.READOUT_DEFAULTS)
    parsed = train_flags.get_args_parser().parse_args([])
    assert {name: getattr(parsed, name) for name in sparo_vit.READOUT_OPTIONS} == dict(sparo_vit.READOUT_DEFAULTS)


def _pil_ops(transform) -> dict[str, object]:
    """The random ops of a v2.Compose, by class name (RandomApply's wrapped transform under its own name)."""
    ops: dict[str, object] = {}
    for op in transform.transforms:
        inner = op.transforms[0] if type(op).__name__ == "RandomApply" else op
        ops[type(inner).__name__] = (op, inner)
    return ops


def test_both_crop_pipelines_build_their_recipe_from_one_table() -> None:
    from sparo_dino.data import crop_recipe
    from sparo_dino.data.augmentation import MultiCropAugmentation
    from sparo_dino.data.batched_augmentation import BatchedMultiCrop

    official = {"FLIP_P": 0.5, "JITTER_P": 0.8, "BRIGHTNESS": 0.4, "CONTRAST": 0.4, "SATURATION": 0.2, "HUE": 0.1,
                "GRAYSCALE_P": 0.2, "GLOBAL1_BLUR_P": 1.0, "GLOBAL2_BLUR_P": 0.1, "LOCAL_BLUR_P": 0.5,
                "GLOBAL2_SOLARIZE_P": 0.2, "SOLARIZE_THRESHOLD": 128, "BLUR_SIGMA_AT_REFERENCE": (0.1, 2.0)}
    assert {name: getattr(crop_recipe, name) for name in official} == official

    pil = MultiCropAugmentation(local_crops_number=1)
    first, second, local = (_pil_ops(t) for t in (pil.global_transform1, pil.global_transform2, pil.local_transform))
    jitter_apply, jitter = first["ColorJitter"]
    assert jitter_apply.p == crop_recipe.JITTER_P
    assert jitter.brightness == (1 - crop_recipe.BRIGHTNESS, 1 + crop_recipe.BRIGHTNESS)
    assert jitter.hue == (-crop_recipe.HUE, crop_recipe.HUE)
    assert first["RandomHorizontalFlip"][1].p == crop_recipe.FLIP_P
    assert first["RandomGrayscale"][1].p == crop_recipe.GRAYSCALE_P
    assert [ops["RandomRadiusBlur"][0].p for ops in (first, second, local)] == [
        crop_recipe.GLOBAL1_BLUR_P, crop_recipe.GLOBAL2_BLUR_P, crop_recipe.LOCAL_BLUR_P]
    assert second["RandomSolarize"][1].p == crop_recipe.GLOBAL2_SOLARIZE_P

    batched = BatchedMultiCrop(local_crops_number=1)
    assert [(view.blur_p, view.solarize_p) for view in batched.views] == [
        (crop_recipe.GLOBAL1_BLUR_P, 0.0), (crop_recipe.GLOBAL2_BLUR_P, crop_recipe.GLOBAL2_SOLARIZE_P),
        (crop_recipe.LOCAL_BLUR_P, 0.0)]


def test_main_dinos_flag_validation_reports_the_recipes_own_crop_check(monkeypatch, capsys) -> None:
    """The multi-crop rules live in augmentation.check_multicrop_args (both pipelines call it); the flag parser
    reports that check's error as its one line instead of keeping a second copy of the rules."""
    import pytest

    from sparo_dino.data import augmentation

    def stricter(**recipe):
        raise ValueError(f"local_crops_number must be even, got {recipe['local_crops_number']}")

    monkeypatch.setattr(augmentation, "check_multicrop_args", stricter)
    with pytest.raises(SystemExit):
        train_flags.parse_train_args(["--data_path", "x", "--local_crops_number", "3"])
    assert "error: --local_crops_number must be even, got 3" in capsys.readouterr().err


def test_a_crop_scale_that_is_not_two_numbers_is_one_line_for_either_pipeline() -> None:
    import pytest

    from sparo_dino.data.augmentation import MultiCropAugmentation
    from sparo_dino.data.batched_augmentation import BatchedMultiCrop

    for pipeline in (MultiCropAugmentation, BatchedMultiCrop):
        with pytest.raises(ValueError, match=r"^global_crops_scale must be two numbers 0 < min <= max <= 1, got 0.4$"):
            pipeline(global_crops_scale=(0.4,))
        with pytest.raises(ValueError, match=r"^local_crop_size must be positive, got 0$"):
            pipeline(local_crop_size=0)


def test_sparo_options_on_a_baseline_are_one_rule_with_one_message_from_the_builder_and_the_flags(capsys) -> None:
    import pytest

    with pytest.raises(ValueError) as error:
        sparo_vit.build_backbone("vit_small", num_slots=32)
    assert str(error.value) == ("num_slots does not apply to the cls read-out of vit_small; use vit_small_mhca or "
                                "vit_small_sparo")
    with pytest.raises(SystemExit):
        train_flags.parse_train_args(["--data_path", "x", "--arch", "vit_small", "--num_slots", "32"])
    assert ("error: --num_slots does not apply to the cls read-out of vit_small; use vit_small_mhca or "
            "vit_small_sparo") in capsys.readouterr().err
