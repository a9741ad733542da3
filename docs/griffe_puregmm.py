"""Griffe extension for the API pages: puregmm's docstrings as the Markdown mkdocstrings renders.

The docstrings are written for ``help()`` and ``doctest`` (Google sections, Sphinx roles, bare
``>>>`` examples, reST simple tables). Three rewrites make them render, without changing them:

* a bare ``>>>`` example (up to the next blank line) becomes a fenced ``pycon`` block;
* a role ``:func:`name``` becomes a link to the API entry of ``name`` when the reference
  documents it (tried as written, under ``puregmm.`` and in the object's module), else code;
* a reST simple table (``====  ====`` borders) becomes a Markdown table.

Loaded by mkdocs.yml (``extensions: - docs/griffe_puregmm.py:PuregmmDocstrings``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:func|class|meth|data|mod|attr|exc|obj):`~?([^`]+)`")
BORDER = re.compile(r"^( *)(=+)( +=+)+ *$")


def documented_names() -> set[str]:
    """Identifiers that have an entry in docs/api/: ``puregmm.__all__`` and its public submodules."""
    import puregmm

    names = {f"puregmm.{n}" for n in puregmm.__all__}
    for module in (puregmm.distributed, puregmm.stream, puregmm.keys):
        for name, value in vars(module).items():
            defined_here = getattr(value, "__module__", None) == module.__name__
            if not name.startswith("_") and defined_here and value.__doc__:  # what the page renders
                names.add(f"{module.__name__}.{name}")
    return names


def link_roles(text: str, module: str, known: set[str]) -> str:
    """Sphinx roles as autorefs links (documented targets) or code spans (anything else)."""

    def one(match: re.Match[str]) -> str:
        target = match.group(1)
        for candidate in (target, f"puregmm.{target}", f"{module}.{target}"):
            if candidate in known:
                return f"[`{target}`][{candidate}]"
        return f"`{target}`"

    return ROLE.sub(one, text)


def fence_examples(lines: list[str]) -> list[str]:
    """Each run of non-blank lines starting with ``>>>`` (outside fences) inside a pycon fence."""
    out: list[str] = []
    in_fence = in_example = False
    indent = ""
    for line in lines:
        stripped = line.lstrip()
        if in_example and not stripped:
            out.append(f"{indent}```")
            in_example = False
        if stripped.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and not in_example and stripped.startswith(">>>"):
            indent = line[: len(line) - len(stripped)]
            out.append(f"{indent}```pycon")
            in_example = True
        out.append(line)
    if in_example:
        out.append(f"{indent}```")
    return out


def _cells(line: str, spans: list[tuple[int, int]]) -> list[str]:
    cells = [line[a:b].strip() for a, b in spans[:-1]]
    return [*cells, line[spans[-1][0] :].strip()]


def convert_tables(lines: list[str]) -> list[str]:
    """reST simple tables (header between the first two borders, if three) as Markdown tables."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = BORDER.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent = match.group(1)
        spans = [(m.start(), m.end()) for m in re.finditer(r"=+", lines[i])]
        ends = [j for j in range(i + 1, len(lines)) if BORDER.match(lines[j])]
        if not ends:  # a lone border line: leave it as text
            out.append(lines[i])
            i += 1
            continue
        if len(ends) > 1 and all(lines[j].strip() for j in range(ends[0] + 1, ends[1])):
            header, body, last = lines[i + 1 : ends[0]], lines[ends[0] + 1 : ends[1]], ends[1]
        else:
            header, body, last = [], lines[i + 1 : ends[0]], ends[0]
        rows = [_cells(row, spans) for row in body if row.strip()]
        head = [" ".join(c) for c in zip(*(_cells(row, spans) for row in header))] if header else [""] * len(spans)
        out.append(indent + "| " + " | ".join(head) + " |")
        out.append(indent + "|" + "---|" * len(spans))
        out.extend(indent + "| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows)
        i = last + 1
    return out


def to_markdown(text: str, module: str, known: set[str]) -> str:
    """All three rewrites of one docstring."""
    return link_roles("\n".join(fence_examples(convert_tables(text.splitlines()))), module, known)


class PuregmmDocstrings(griffe.Extension):
    """Rewrites every docstring of the loaded package once the object tree is complete."""

    def __init__(self) -> None:
        self.known = documented_names()

    def on_object(self, *, obj: griffe.Object, loader: Any = None, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value, obj.module.path, self.known)
