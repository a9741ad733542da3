"""The examples in the docstrings run and print what they show (``doctest``)."""

import doctest
import importlib
import pkgutil

import pytest

import puregmm

MODULES = sorted(
    m.name for m in pkgutil.iter_modules(puregmm.__path__, "puregmm.") if m.name not in ("puregmm.__main__",)
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed in {name}"


def test_the_package_has_examples() -> None:
    """Guards the test above against finding nothing to run."""
    attempted = sum(doctest.testmod(importlib.import_module(n), report=False).attempted for n in MODULES)
    assert attempted >= 50
