"""The curated mutation list (tests/mutation/mutations.py, run by `make mutation`) still fits the code: every
snippet occurs exactly once, every mutant is valid Python, and every test it names exists. Cheap enough for the
default suite, so the list cannot rot silently between mutation runs."""
from __future__ import annotations

import ast
import os
import re

import pytest
from mutation.mutations import MUTATIONS, Mutation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_names_are_unique() -> None:
    names = [mutation.name for mutation in MUTATIONS]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda mutation: mutation.name)
def test_snippet_is_found_once_and_the_mutant_compiles(mutation: Mutation) -> None:
    with open(os.path.join(REPO, mutation.path)) as handle:
        source = handle.read()
    mutant = mutation.apply(source)
    assert mutant != source
    if mutation.path.endswith(".py"):
        ast.parse(mutant, mutation.path)  # a syntax error would be "caught" by any test


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda mutation: mutation.name)
def test_named_tests_exist(mutation: Mutation) -> None:
    assert mutation.tests
    for test in mutation.tests:
        path, _, name = test.partition("::")
        assert os.path.isfile(os.path.join(REPO, path)), test
        if name:
            with open(os.path.join(REPO, path)) as handle:
                source = handle.read()
            function = name.split("[")[0]
            assert re.search(rf"^def {re.escape(function)}\(", source, re.MULTILINE), test
