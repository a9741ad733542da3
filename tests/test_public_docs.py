"""Every public function and class of ``puregmm`` documents its inputs, its result and an example.

The API reference (``mkdocs build``) renders these docstrings; ``tests/test_docstrings.py`` runs
their examples. Constants (``FAMILIES``, ``__version__``) and submodules are not checked here.
"""

import importlib.util
import inspect
import re
import types
from pathlib import Path
from typing import NamedTuple

import pytest

import puregmm


def _public_objects() -> list[str]:
    names = []
    for name in puregmm.__all__:
        obj = getattr(puregmm, name)
        if isinstance(obj, types.ModuleType) or not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        names.append(name)
    return names


def _has_section(doc: str, title: str) -> bool:
    """A Google-style section header: the title alone on an unindented line."""
    return re.search(rf"^{title}:[ \t]*$", doc, re.MULTILINE) is not None


def _fields(cls: type) -> tuple[str, ...]:
    """Fields of a NamedTuple or dataclass; () for other classes (e.g. a warning)."""
    if hasattr(cls, "_fields"):
        return tuple(cls._fields)
    return tuple(getattr(cls, "__dataclass_fields__", {}))


def missing_sections(obj: object) -> list[str]:
    """What ``obj``'s own docstring lacks: a text, Args/Attributes, Returns, a ``>>>`` example."""
    doc = inspect.cleandoc(obj.__doc__ or "")
    if not doc or (inspect.isclass(obj) and doc.startswith(f"{obj.__name__}(")):  # NamedTuple's default
        return ["a docstring"]
    missing = []
    if inspect.isclass(obj):
        if _fields(obj) and not _has_section(doc, "Attributes"):
            missing.append("Attributes")
    else:
        signature = inspect.signature(obj)
        if signature.parameters and not _has_section(doc, "Args"):
            missing.append("Args")
        if signature.return_annotation not in (None, "None") and not _has_section(doc, "Returns"):
            missing.append("Returns")
    if not re.search(r"^>>> ", doc, re.MULTILINE):
        missing.append("an example (>>>)")
    return missing


PUBLIC = _public_objects()


def test_the_public_names_are_found() -> None:
    """Guards the check below against running over nothing."""
    assert {"fit", "em_step", "GMMParams", "FitResult", "plot_fit", "load"} <= set(PUBLIC)
    assert "FAMILIES" not in PUBLIC and "distributed" not in PUBLIC


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_is_documented(name: str) -> None:
    missing = missing_sections(getattr(puregmm, name))
    assert not missing, f"puregmm.{name}'s docstring lacks: {', '.join(missing)}"


def _bare(x, y=1):
    """Adds."""
    return x + y


def _complete(x: int) -> int:
    """Adds one.

    Args:
        x: a number.

    Returns:
        x + 1.

    >>> _complete(1)
    2
    """
    return x + 1


def test_the_check_can_fail() -> None:
    assert missing_sections(_bare) == ["Args", "Returns", "an example (>>>)"]
    assert missing_sections(_complete) == []

    class Point(NamedTuple):
        x: float

    assert missing_sections(Point) == ["a docstring"]  # the NamedTuple's generated "Point(x)" is not one


# --- the documentation site (docs/) ---------------------------------------------------------------

DOCS = Path(__file__).parent.parent / "docs"


def test_the_api_reference_has_every_public_name() -> None:
    """docs/api/*.md render each name of ``puregmm.__all__`` (one ``::: puregmm.name`` each)."""
    pages = "\n".join(p.read_text(encoding="utf-8") for p in sorted((DOCS / "api").glob("*.md")))
    rendered = re.findall(r"^::: puregmm\.(\w+)\s*$", pages, re.MULTILINE)
    assert len(rendered) == len(set(rendered)), "a name is rendered twice"
    missing = set(puregmm.__all__) - {"__version__"} - set(rendered)
    assert not missing, f"docs/api/ lacks an entry for {sorted(missing)}"


PAGES = sorted([*DOCS.glob("*.md"), *DOCS.glob("guide/*.md")])


def python_blocks(markdown: str) -> list[str]:
    """The ```python blocks of a page (```py and ```bash blocks are shown, not run)."""
    return re.findall(r"^```python\n(.*?)^```\s*$", markdown, re.MULTILINE | re.DOTALL)


def test_pages_have_runnable_examples() -> None:
    """Guards the test below against finding nothing to run."""
    assert sum(len(python_blocks(p.read_text(encoding="utf-8"))) for p in PAGES) >= 15


@pytest.mark.parametrize(
    "page", [p for p in PAGES if python_blocks(p.read_text(encoding="utf-8"))], ids=lambda p: str(p.relative_to(DOCS))
)
def test_page_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A page's ```python blocks run top to bottom in one namespace, as a reader would paste them."""
    monkeypatch.chdir(tmp_path)  # examples may write files (a figure)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for i, block in enumerate(python_blocks(page.read_text(encoding="utf-8"))):
        exec(compile(block, f"{page.relative_to(DOCS)}, block {i + 1}", "exec"), namespace)


def test_notebooks_draw_inline() -> None:
    """The site executes the notebooks with MPLBACKEND=Agg set (as CI does); only the inline
    backend, selected in the first code cell, still puts their figures into the page."""
    nbformat = pytest.importorskip("nbformat")
    notebooks = sorted((DOCS.parent / "notebooks").glob("*.ipynb"))
    assert notebooks
    for path in notebooks:
        cells = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
        if any("matplotlib" in c.source for c in cells):
            assert cells[0].source.startswith("%matplotlib inline"), f"{path.name}: first code cell"


def _plots_module() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("docs_plots", DOCS / "plots.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_page_draws_every_readme_table() -> None:
    """docs/plots.py (the Benchmarks page) recognises each table of the README's Benchmarks
    section and reads its numbers; a reworded table fails here before it fails the site build."""
    plots = _plots_module()
    assert plots.number("**5.0×**") == 5.0 and plots.number("1,283 MB") == 1283.0 and plots.number("–") is None
    readme = (DOCS.parent / "README.md").read_text(encoding="utf-8")
    tables = [rows for _, rows in plots.split_tables(plots.readme_section(readme)) if rows is not None]
    assert len(tables) >= 4
    for rows in tables:
        assert plots.figures_for(rows), rows[0]
    with pytest.raises(ValueError, match="does not know how to draw"):
        plots.figures_for([{"a": "1", "b": "2"}])
