"""Facts that used to be written in several places now have one definition that every user reads.

Each test changes or inspects the one definition and checks that the other users follow it, so a second copy
creeping back in fails here instead of drifting silently.
"""
from __future__ import annotations

import inspect

import sparo_vit
from sparo_dino import train_args


def test_sparo_defaults_have_one_definition_read_by_the_module_the_builder_and_the_flags() -> None:
    defaults = sparo_vit.SPARO_DEFAULTS
    assert dict(defaults) == {"num_slots": 64, "slot_dim": 64, "attn_dim": 64, "group_size": 1}
    signature = inspect.signature(sparo_vit.SPARO)
    assert {name: signature.parameters[name].default for name in defaults} == dict(defaults)
    assert sparo_vit.SPARO_OPTIONS == tuple(defaults)
    parsed = train_args.get_args_parser().parse_args([])
    assert {name: getattr(parsed, name) for name in defaults} == dict(defaults)
