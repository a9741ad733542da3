"""The Benchmarks page: the README's benchmark section, each table followed by its figures.

The numbers live in one place, README.md's "## Benchmarks" section (written by the people who
ran ``benchmarks/*.py``). This script parses its Markdown tables and draws them with
matplotlib; as a mkdocs hook (``hooks:`` in mkdocs.yml) it inserts the section and the figures
into ``docs/benchmarks.md`` at build time, so the page cannot disagree with the README. A table
it does not recognise, or one that no longer parses, fails the build.

Run alone to write the figures as PNG files: ``python docs/plots.py --out /tmp/figures``.
"""

from __future__ import annotations

import argparse
import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MARKER = "<!-- benchmarks from README.md -->"
COLORS = {"puregmm": "#1f77b4", "scikit-learn": "#ff7f0e", "gmmx": "#2ca02c", "MixtureSameFamily": "#d62728"}

Table = list[dict[str, str]]


def readme_section(text: str, title: str = "Benchmarks") -> str:
    """The body of the README's ``## title`` section (up to the next ``## ``)."""
    match = re.search(rf"^## {title}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    if match is None:
        raise ValueError(f"README.md has no '## {title}' section")
    return match.group(1).strip("\n")


def split_tables(section: str) -> list[tuple[str, Table | None]]:
    """The section as blocks: (markdown, None) for prose, (markdown, rows) for each table."""
    blocks: list[tuple[str, Table | None]] = []
    prose: list[str] = []
    lines = section.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|[-| :]+\|$", lines[i + 1]):
            j = i + 2
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            if prose:
                blocks.append(("\n".join(prose), None))
                prose = []
            header = _cells(lines[i])
            rows = [dict(zip(header, _cells(row))) for row in lines[i + 2 : j]]
            blocks.append(("\n".join(lines[i:j]), rows))
            i = j
        else:
            prose.append(lines[i])
            i += 1
    if prose:
        blocks.append(("\n".join(prose), None))
    return blocks


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def number(cell: str) -> float | None:
    """``0.056 s``, ``**5.0×**``, ``1,283 MB``, ``-3.53`` -> float; ``–`` or prose -> None."""
    match = re.fullmatch(r"\**\s*(-?[\d,]*\.?\d+(?:e-?\d+)?)\s*(?:s|×|MB|M|%)?\s*\**", cell.strip())
    return float(match.group(1).replace(",", "")) if match else None


def _figure(width: float, height: float) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _bars(ax: Any, labels: list[str], series: dict[str, list[Any]], unit: str, log: bool = False) -> None:
    """Grouped bars, each labelled with its value; a cell that is not a number is written instead."""
    n = len(series)
    width = 0.8 / n
    for s, (name, cells) in enumerate(series.items()):
        xs = [i + (s - (n - 1) / 2) * width for i in range(len(labels))]
        values = [number(c) if isinstance(c, str) else c for c in cells]
        kept = [(x, v) for x, v in zip(xs, values) if v is not None]
        bars = ax.bar([x for x, _ in kept], [v for _, v in kept], width, label=name, color=COLORS.get(name))
        ax.bar_label(bars, labels=[f"{v:g}{unit}" for _, v in kept], fontsize=7, padding=1)
        for x, cell, v in zip(xs, cells, values):
            if v is None and isinstance(cell, str) and cell.strip("–- "):
                ax.annotate(cell, (x, 0.02), xycoords=("data", "axes fraction"), ha="center", fontsize=7, rotation=90)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlim(-0.5, len(labels) - 0.5)
    if log:
        ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def em_vs_sklearn(rows: Table) -> Any:
    """Speed-up of one EM iteration over scikit-learn, per (size, family), float64 and float32."""
    keys = list(dict.fromkeys(f"{r['N, D, K']}\n{r['family']}" for r in rows))
    series: dict[str, list[float | None]] = {}
    for dtype in ("float64", "float32"):
        found = {f"{r['N, D, K']}\n{r['family']}": number(r["speed-up"]) for r in rows if r["dtype"] == dtype}
        series[dtype] = [found.get(k) for k in keys]
    fig, ax = _figure(8, 3.6)
    _bars(ax, keys, series, "×")
    ax.axhline(1, color="gray", lw=0.8)
    ax.set(ylabel="speed-up over scikit-learn (×)", title="One EM iteration: puregmm vs scikit-learn GaussianMixture")
    return fig


def seconds_by_contender(rows: Table, size: str, contenders: list[str], title: str) -> Any:
    """Seconds per contender for each row (log scale), bars labelled with the seconds."""
    labels = [f"{r[size]}\n{r.get('family', '')}".strip() for r in rows]
    series = {c: [r[c] for r in rows] for c in contenders}
    fig, ax = _figure(7, 3.6)
    _bars(ax, labels, series, " s", log=True)
    ax.set(ylabel="seconds (log scale, lower is better)", title=title)
    return fig


def time_vs_size(rows: Table) -> Any:
    """Seconds against N for each contender and family (the gmmx table: D and K grow with N)."""
    fig, ax = _figure(6, 3.8)
    for family, style in (("full", "-"), ("diagonal", "--")):
        picked = [r for r in rows if r["family"] == family]
        ns = [float(r["N, D, K"].split(",")[0]) for r in picked]
        for name in ("puregmm", "gmmx", "scikit-learn"):
            ts = [number(r[name]) for r in picked]
            ax.plot(ns, ts, style, marker="o", color=COLORS[name], label=f"{name}, {family}")
    sizes = " and ".join(f"({r['N, D, K']})" for r in rows if r["family"] == "full")
    ax.set(xscale="log", yscale="log", xlabel=f"N; (N, D, K) = {sizes}", ylabel="seconds per EM iteration")
    ax.set_title("Time vs size, float32 (lower is better)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return fig


def batched(rows: Table) -> Any:
    """Seconds of each way to run B=1000 small fits."""
    fig, ax = _figure(7, 3.4)
    names = [r["contender"].replace("`", "") for r in rows]
    values = [number(r["seconds"]) or 0.0 for r in rows]
    colors = [COLORS["puregmm"] if "pg." in n else COLORS["scikit-learn"] for n in names]
    bars = ax.barh(names, values, color=colors)
    ax.bar_label(bars, labels=[f"{v:g} s" for v in values], fontsize=8, padding=2)
    ax.invert_yaxis()
    ax.set(xlabel="seconds (lower is better)", title="Many small fits (the command above)")
    ax.grid(axis="x", alpha=0.3)
    return fig


def out_of_core(rows: Table) -> Any:
    """Peak memory of a streamed and an in-memory fit."""
    fig, ax = _figure(6, 2.6)
    names = [r["contender"] for r in rows]
    values = [number(r["peak RssAnon above baseline"]) or 0.0 for r in rows]
    bars = ax.barh(names, values, color=[COLORS["puregmm"], "#9ecae1"])
    ax.bar_label(bars, labels=[f"{v:,.0f} MB" for v in values], fontsize=8, padding=2)
    ax.invert_yaxis()
    ax.set(xlabel="peak memory above baseline (MB)", title="Out of core (the command above)")
    return fig


def figures_for(rows: Table) -> list[tuple[str, str, Callable[[], Any]]]:
    """(file name, caption, draw) for a README table, recognised by its columns."""
    cols = set(rows[0]) if rows else set()
    if {"dtype", "scikit-learn", "speed-up", "of bound"} <= cols:
        return [
            ("em_speedup.png", "Speed-up of one EM iteration over scikit-learn", lambda: em_vs_sklearn(rows)),
            (
                "em_seconds.png",
                "Seconds per EM iteration, float64",
                lambda: seconds_by_contender(
                    [r for r in rows if r["dtype"] == "float64"],
                    "N, D, K",
                    ["puregmm", "scikit-learn"],
                    "One EM iteration, float64",
                ),
            ),
        ]
    if {"gmmx", "puregmm", "scikit-learn"} <= cols:
        return [
            (
                "em_gmmx.png",
                "Seconds per EM iteration against gmmx and scikit-learn, float32",
                lambda: seconds_by_contender(
                    rows, "N, D, K", ["puregmm", "gmmx", "scikit-learn"], "One EM iteration, float32"
                ),
            ),
            ("em_time_vs_n.png", "Seconds per EM iteration against N, float32", lambda: time_vs_size(rows)),
        ]
    if {"MixtureSameFamily", "puregmm"} <= cols:
        sized = [dict(r, size=f"{r['N']}, {r['D']}, {r['K']}") for r in rows]
        return [
            (
                "grad_msf.png",
                "Seconds per loss and gradient (a missing bar: MixtureSameFamily does not fit in memory)",
                lambda: seconds_by_contender(
                    sized, "size", ["puregmm", "MixtureSameFamily"], "Loss + gradient, float32, full"
                ),
            )
        ]
    if {"contender", "init timed", "seconds"} <= cols:
        return [("batched.png", "Many small fits", lambda: batched(rows))]
    if {"contender", "peak RssAnon above baseline"} <= cols:
        return [("out_of_core.png", "Peak memory, streamed vs in memory", lambda: out_of_core(rows))]
    raise ValueError(f"docs/plots.py does not know how to draw the README table with columns {sorted(cols)}")


def png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def page(readme: str, folder: str = "benchmarks") -> tuple[str, dict[str, bytes]]:
    """The README's benchmark section with each table's figures after it, and the PNGs by path."""
    parts: list[str] = []
    images: dict[str, bytes] = {}
    for markdown, rows in split_tables(readme_section(readme)):
        parts.append(markdown)
        for name, caption, draw in [] if rows is None else figures_for(rows):
            images[f"{folder}/{name}"] = png(draw())
            parts.append(f"![{caption}]({folder}/{name})")
    if not images:
        raise ValueError("README.md's Benchmarks section has no tables to draw")
    return "\n\n".join(parts), images


# --- mkdocs hook --------------------------------------------------------------------------------

_IMAGES: dict[str, bytes] = {}
_SECTION: list[str] = []


def on_files(files: Any, config: Any) -> Any:
    """Draw the figures and add them to the site as generated files."""
    from mkdocs.structure.files import File

    section, images = page((ROOT / "README.md").read_text(encoding="utf-8"))
    _SECTION[:] = [section]
    for path, content in images.items():
        files.append(File.generated(config, path, content=content))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Put the README's benchmark section, with the figures, where the page has the marker."""
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, _SECTION[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNG files")
    args = parser.parse_args()
    _, images = page((ROOT / "README.md").read_text(encoding="utf-8"), folder=".")
    args.out.mkdir(parents=True, exist_ok=True)
    for path, content in images.items():
        (args.out / Path(path).name).write_bytes(content)
        print(args.out / Path(path).name)


if __name__ == "__main__":
    main()
