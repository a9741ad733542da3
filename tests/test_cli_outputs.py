"""The CLI never loses a file and names every bad input (issue 14: items 1-3, 5, 17, 18, 20, 21).

One test per item, each failing before its fix: outputs checked before any work and written
whole, never over an input, through symlinks, never over a device or FIFO; unwritable outputs,
out-of-range --threads and every bad-input error class exit 2 with one line; bugs exit 1.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import puregmm as pg
from puregmm import cli
from tests.strategies import random_params

ROOT = Path(__file__).resolve().parents[1]


def two_blobs(n: int = 120, d: int = 2, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    x[: n // 2] += 6.0
    return x


def write_csv(path: Path, x: np.ndarray) -> Path:
    np.savetxt(path, x, delimiter=",", header="a,b", comments="", fmt="%.17g")
    return path


@pytest.fixture
def csv_data(tmp_path: Path) -> tuple[Path, np.ndarray]:
    x = two_blobs()
    return write_csv(tmp_path / "data.csv", x), x


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-component, 2-D model file (the data of these tests has D = 2)."""
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    pg.save(random_params("full", 2, 2, seed=0), path)
    return path


def snapshot(folder: Path) -> dict[str, Any]:
    """Every entry under ``folder``: kind and bytes (files), target (links)."""
    out: dict[str, Any] = {}
    for p in sorted(folder.rglob("*")):
        key = str(p.relative_to(folder))
        if p.is_symlink():
            out[key] = ("link", os.readlink(p))
        elif p.is_file():
            out[key] = ("file", p.read_bytes())
        else:
            out[key] = ("dir" if p.is_dir() else "special", p.stat().st_mode)
    return out


def one_error_line(err: str, command: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"puregmm {command}: error: "), err
    return lines[0]


def test_score_with_bad_data_keeps_the_old_scores(tmp_path: Path, model: Path, capsys) -> None:
    """Item 1: the NaN row is found before the output is opened; scores.csv keeps its contents."""
    x = two_blobs(30)
    x[17, 0] = np.nan
    write_csv(tmp_path / "bad.csv", x)
    (tmp_path / "scores.csv").write_text("log_prob,component\n1.5,0\n")
    before = snapshot(tmp_path)
    assert cli.main(["score", str(model), str(tmp_path / "bad.csv"), "--out", str(tmp_path / "scores.csv")]) == 2
    assert "first bad rows: [17]" in one_error_line(capsys.readouterr().err, "score")
    assert snapshot(tmp_path) == before


def test_an_error_while_scoring_keeps_the_old_scores(tmp_path: Path, model: Path, monkeypatch) -> None:
    """Item 1: an error in the third chunk (after two were written) leaves the old file, no temp."""
    from puregmm import _cli_use

    write_csv(tmp_path / "d.csv", two_blobs(50))
    (tmp_path / "scores.csv").write_text("old\n")
    monkeypatch.setattr(_cli_use, "SCORE_CHUNK", 10)
    real, calls = pg.component_log_prob, [0]

    def fails_third(params: Any, x: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return real(params, x)

    monkeypatch.setattr(pg, "component_log_prob", fails_third)
    assert cli.main(["score", str(model), str(tmp_path / "d.csv"), "--out", str(tmp_path / "scores.csv")]) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.csv", "scores.csv"]
    assert (tmp_path / "scores.csv").read_text() == "old\n"


@pytest.mark.parametrize("alias", ["same", "symlink", "hardlink"])
def test_an_output_that_is_an_input_is_refused(tmp_path: Path, model: Path, capsys, alias: str) -> None:
    """Item 2: score over its data (.npy, .csv), sample over its model, demo's two outputs."""
    shutil.copy(model, tmp_path / "m.safetensors")
    np.save(tmp_path / "d.npy", two_blobs(20))
    write_csv(tmp_path / "d.csv", two_blobs(20))

    def out(name: str) -> str:
        if alias == "same":
            return str(tmp_path / name)
        link = tmp_path / f"{alias}-{name}"
        if not link.exists():
            (link.symlink_to if alias == "symlink" else link.hardlink_to)(tmp_path / name)
        return str(link)

    m = str(tmp_path / "m.safetensors")
    runs = [
        ("score", [m, str(tmp_path / "d.npy"), "--out", out("d.npy")], "is the same file as DATA"),
        ("score", [m, str(tmp_path / "d.csv"), "--out", out("d.csv")], "is the same file as DATA"),
        ("score", [m, str(tmp_path / "d.csv"), "--out", out("m.safetensors")], "is the same file as MODEL"),
        ("sample", [m, "5", "--out", out("m.safetensors")], "is the same file as MODEL"),
        ("demo", ["--out", str(tmp_path / "pic.png"), "--save-data", str(tmp_path / "pts.npy")], "same file as --out"),
    ]
    (tmp_path / "pts.npy").symlink_to(tmp_path / "pic.png")  # a new path, reached twice
    before = snapshot(tmp_path)
    for command, args, message in runs:
        assert cli.main([command, *args]) == 2, (command, args)
        assert message in one_error_line(capsys.readouterr().err, command)
    assert snapshot(tmp_path) == before


def test_fit_refuses_to_write_over_its_data(tmp_path: Path, capsys) -> None:
    """Item 2: DATA reached through a link into DIR would be replaced by report.json."""
    run = tmp_path / "run"
    run.mkdir()
    write_csv(run / "report.json", two_blobs(40))  # a CSV under an output's name
    (tmp_path / "d.csv").symlink_to(run / "report.json")
    before = snapshot(tmp_path)
    assert cli.main(["fit", str(tmp_path / "d.csv"), "-k", "2", "--out", str(run), "-q", "--no-plot"]) == 2
    assert "--out report.json" in one_error_line(capsys.readouterr().err, "fit")
    assert snapshot(tmp_path) == before


def test_sample_through_a_symlink_writes_the_target(tmp_path: Path, model: Path) -> None:
    """Item 3: the link stays a link; its target gets the samples."""
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "s.npy").write_bytes(b"old")
    link = tmp_path / "s.npy"
    link.symlink_to(tmp_path / "real" / "s.npy")
    assert cli.main(["sample", str(model), "7", "--seed", "2", "--out", str(link)]) == 0
    assert link.is_symlink()
    np.testing.assert_array_equal(np.load(tmp_path / "real" / "s.npy"), pg.sample(pg.load(model), 7, key=2)[0])
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["s.npy"]


def test_special_files_are_never_replaced(tmp_path: Path, model: Path, capsys) -> None:
    """Item 3: a FIFO (and, as root, a device node like /dev/full) is refused and left as it was."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    specials = [fifo]
    if os.geteuid() == 0:
        os.mknod(tmp_path / "full", 0o666 | stat.S_IFCHR, os.makedev(1, 7))  # /dev/full's numbers
        specials.append(tmp_path / "full")
    write_csv(tmp_path / "d.csv", two_blobs(10))
    before = snapshot(tmp_path)
    for special in specials:
        for command, args in (("sample", [str(model), "3"]), ("score", [str(model), str(tmp_path / "d.csv")])):
            assert cli.main([command, *args, "--out", str(special)]) == 2
            assert "writes regular files only" in one_error_line(capsys.readouterr().err, command)
    assert snapshot(tmp_path) == before


def read_only(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``folder`` unwritable: chmod, and as root (who ignores modes) refuse it in os.access
    and tempfile.mkstemp as the kernel would for anyone else."""
    folder.chmod(0o555)
    if os.geteuid() != 0:
        return
    import tempfile

    real_access, real_mkstemp = os.access, tempfile.mkstemp

    def access(path: Any, mode: int, **kw: Any) -> bool:
        return False if Path(path).resolve() == folder.resolve() and mode & os.W_OK else real_access(path, mode, **kw)

    def mkstemp(*args: Any, dir: Any = None, **kw: Any) -> Any:
        if dir is not None and Path(dir).resolve() == folder.resolve():
            raise PermissionError(13, "Permission denied", str(dir))
        return real_mkstemp(*args, dir=dir, **kw)

    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def test_outputs_that_cannot_be_written_exit_2_naming_the_path(tmp_path: Path, model: Path, monkeypatch, capsys):
    """Item 17: parent is a file, folder is read-only, output is a folder: one line, exit 2."""
    write_csv(tmp_path / "d.csv", two_blobs(10))
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    (tmp_path / "ro").mkdir()
    read_only(tmp_path / "ro", monkeypatch)
    m, d = str(model), str(tmp_path / "d.csv")
    runs = [
        (["sample", m, "3", "--out", str(tmp_path / "file" / "s.npy")], "is a file, not a folder"),
        (["score", m, d, "--out", str(tmp_path / "file" / "s.csv")], "is a file, not a folder"),
        (["fit", d, "-k", "2", "--out", str(tmp_path / "file" / "run")], "is a file, not a folder"),
        (["sample", m, "3", "--out", str(tmp_path / "folder")], "is a folder"),
        (["score", m, d, "--out", str(tmp_path / "folder")], "is a folder"),
        (["sample", m, "3", "--out", str(tmp_path / "ro" / "s.npy")], "no permission"),
        (["score", m, d, "--out", str(tmp_path / "ro" / "s.csv")], "no permission"),
        (["fit", d, "-k", "2", "--out", str(tmp_path / "ro")], "no permission"),
        (["fit", d, "-k", "2", "--out", str(tmp_path / "ro" / "run")], "no permission"),
    ]
    try:
        for args, message in runs:
            assert cli.main([*args, "-q"] if args[0] == "fit" else args) == 2, args
            line = one_error_line(capsys.readouterr().err, args[0])
            assert message in line and args[args.index("--out") + 1].split("/")[-1] in line, line
    finally:
        (tmp_path / "ro").chmod(0o755)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.csv", "file", "folder", "ro"]
    assert not list((tmp_path / "ro").iterdir()) and not list((tmp_path / "folder").iterdir())


def test_threads_are_bounded_by_the_cpu_count(model: Path, tmp_path: Path, capsys) -> None:
    """Item 18: --threads 100000 crashed the process at exit; now a usage error naming the bound."""
    n = os.cpu_count() or 1
    before = torch.get_num_threads()
    try:
        for bad in (str(n + 1), "100000", "0", "-3", "1.5"):
            assert cli.main(["sample", str(model), "3", "--threads", bad, "--out", str(tmp_path / "s.npy")]) == 2
            assert f"from 1 to {n}" in capsys.readouterr().err
        assert not (tmp_path / "s.npy").exists()
        assert cli.main(["sample", str(model), "3", "--threads", str(n), "--out", str(tmp_path / "s.npy")]) == 0
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (PermissionError(13, "Permission denied", "/x/y"), 2),
        (IsADirectoryError(21, "Is a directory", "/x/y"), 2),
        (NotADirectoryError(20, "Not a directory", "/x/y"), 2),
        (FileExistsError(17, "File exists", "/x/y"), 2),
        (UnicodeDecodeError("utf-8", b"\x80", 0, 1, "invalid start byte"), 2),
        (OSError(28, "No space left on device"), 2),
        (OSError(30, "Read-only file system"), 2),
        (ValueError("first line\nsecond line"), 2),
        (RuntimeError("a bug"), 1),
        (TypeError("a bug"), 1),
        (OSError(9, "Bad file descriptor"), 1),
        (KeyError("a bug"), 1),
    ],
)
def test_every_bad_input_class_exits_2_and_bugs_exit_1(model: Path, monkeypatch, capsys, error, code) -> None:
    """Item 20: bad input and the environment give exit 2 and one line; bugs exit 1 with a traceback."""

    def raises(*args: Any, **kwargs: Any) -> None:
        raise error

    monkeypatch.setattr(pg, "sample", raises)
    assert cli.main(["sample", str(model), "3"]) == code
    err = capsys.readouterr().err
    if code == 2:
        one_error_line(err, "sample")
    else:
        assert "Traceback" in err and "unexpected error" in err


def test_resume_under_another_seed_is_refused(tmp_path: Path, csv_data, capsys) -> None:
    """Item 5 through the CLI: the report would have recorded the new seed for the old run."""
    base = ["fit", str(csv_data[0]), "-k", "2", "--max-steps", "5", "--out", str(tmp_path), "-q", "--no-plot"]
    assert cli.main([*base, "--seed", "0"]) == 0
    capsys.readouterr()
    report = (tmp_path / "report.json").read_bytes()
    assert cli.main([*base, "--seed", "5", "--max-steps", "10", "--resume"]) == 2
    assert "keys: checkpoint [0] vs now [5]" in one_error_line(capsys.readouterr().err, "fit")
    assert (tmp_path / "report.json").read_bytes() == report


def test_safetensors_is_a_core_dependency() -> None:
    """Item 21: every fit writes a safetensors checkpoint and model; a bare install needs it."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(d.replace(" ", "").startswith("safetensors") for d in project["dependencies"])


NO_MATPLOTLIB = (
    "import sys; sys.modules['matplotlib'] = None; from puregmm.cli import main; sys.exit(main(sys.argv[1:]))"
)


def test_fit_and_demo_without_matplotlib(tmp_path: Path, csv_data) -> None:
    """Item 21: fit writes everything else and says in one line how to get the picture; demo exits 2."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-c", NO_MATPLOTLIB, *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)

    done = run("fit", str(csv_data[0]), "-k", "2", "--max-steps", "5", "--out", "run", "-q")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [cli.CHECKPOINT, "model.safetensors", "report.json"]
    notes = [line for line in done.stderr.splitlines() if "fit.png" in line]
    assert len(notes) == 1 and "pip install" in notes[0]
    done = run("demo", "--out", "demo.png", "--save-data", "p.csv")
    assert done.returncode == 2 and "matplotlib" in one_error_line(done.stderr, "demo")
    assert not (tmp_path / "demo.png").exists() and not (tmp_path / "p.csv").exists()
