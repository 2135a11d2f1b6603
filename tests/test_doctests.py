"""Every ``Example:`` in the core's docstrings runs as a doctest."""

import doctest
import importlib
import pkgutil

import pytest
import torch

import ebm_prior
import ebm_prior.apps

MODULES = [
    m.name
    for package in (ebm_prior, ebm_prior.apps)
    for m in pkgutil.iter_modules(package.__path__, package.__name__ + ".")
    if not m.ispkg
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    torch.manual_seed(0)
    result = doctest.testmod(
        module,
        extraglobs={"torch": torch, **{k: getattr(ebm_prior, k) for k in ebm_prior.__all__}},
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
    )
    assert result.failed == 0


def test_some_examples_exist():
    finder = doctest.DocTestFinder()
    count = sum(
        len(t.examples) for name in MODULES for t in finder.find(importlib.import_module(name))
    )
    assert count >= 10
