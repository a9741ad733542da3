"""Reliability of the CLI and the file writers under generated bad input (issue 14).

The rule checked everywhere: a command exits 0 having written its output whole (to the
resolved target, inputs untouched), or exits 2 with one error line and every file exactly as it
was; never 1 (a bug), never a lost, truncated or replaced file, never a stray temporary file.
Inputs come from Hypothesis (deterministic under ``CI=true``, see conftest.py): output paths of
every kind (new, existing, folders, FIFOs, symlinks, links into missing folders, loops, the
inputs themselves), data files of every kind (good, NaN rows, wrong D, latin-1, binary, empty)
and arguments (numbers out of range, text). Writers are also SIGKILLed mid-write.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import puregmm as pg
from puregmm import cli
from puregmm.data import load_data
from tests.strategies import random_params

ROOT = Path(__file__).resolve().parents[1]
D = 2


# --- a sandbox: model, data, and an output path of a given kind ------------------------------


def snapshot(root: Path) -> dict[str, Any]:
    """Every entry under ``root`` (links not followed): bytes of files, targets of links."""
    out: dict[str, Any] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(folder) / name
            key = str(p.relative_to(root))
            if p.is_symlink():
                out[key] = ("link", os.readlink(p))
            elif p.is_file():
                out[key] = ("file", p.read_bytes())
            else:
                out[key] = ("dir" if p.is_dir() else "special", os.lstat(p).st_mode)
    return out


def _link(root: Path, name: str, target: Path) -> Path:
    (root / name).symlink_to(target)
    return root / name


def _loop(root: Path) -> Path:
    (root / "a").symlink_to(root / "b")
    (root / "b").symlink_to(root / "a")
    return root / "a"


def _file(path: Path, content: bytes = b"old contents\n") -> Path:
    path.write_bytes(content)
    return path


OUTPUTS: dict[str, Callable[[Path], Path]] = {
    "new file": lambda r: r / "out.bin",
    "existing file": lambda r: _file(r / "out.bin"),
    "folder": lambda r: (r / "sub").resolve(),
    "fifo": lambda r: (os.mkfifo(r / "fifo"), r / "fifo")[1],
    "link to a file": lambda r: _link(r, "link", _file(r / "sub" / "target")),
    "dangling link": lambda r: _link(r, "link", r / "sub" / "new"),
    "link into a missing folder": lambda r: _link(r, "link", r / "missing" / "new"),
    "link to a folder": lambda r: _link(r, "link", r / "sub"),
    "link to a fifo": lambda r: _link(r, "link", (os.mkfifo(r / "fifo"), r / "fifo")[1]),
    "under a file": lambda r: _file(r / "plain") / "out.bin",
    "under a missing folder": lambda r: r / "missing" / "out.bin",
    "the model": lambda r: r / "m.safetensors",
    "the data": lambda r: r / "data.csv",
    "a hard link to the data": lambda r: ((r / "hard").hardlink_to(r / "data.csv"), r / "hard")[1],
    "a link to the model": lambda r: _link(r, "link", r / "m.safetensors"),
    "a symlink loop": _loop,
    "a name too long": lambda r: r / ("x" * 300),
}

DATA: dict[str, Callable[[np.ndarray], bytes]] = {
    "good": lambda x: _csv(x),
    "NaN row": lambda x: _csv(np.where(np.arange(len(x))[:, None] == 3, np.nan, x)),
    "inf": lambda x: _csv(np.where(np.arange(len(x))[:, None] == 1, np.inf, x)),
    "wrong D": lambda x: _csv(np.column_stack([x, x[:, :1]])),
    "latin-1": lambda x: _csv(x).replace(b"a,b", "\u00e9,b".encode("latin-1")),
    "binary": lambda x: bytes(range(256)) * 3,
    "empty": lambda x: b"",
    "header only": lambda x: b"a,b\n",
}


def _csv(x: np.ndarray) -> bytes:
    buf = io.StringIO()
    np.savetxt(buf, x, delimiter=",", header="a,b", comments="", fmt="%.17g")
    return buf.getvalue().encode()


def sandbox(root: Path, data_kind: str = "good") -> tuple[pg.GMMParams, np.ndarray]:
    """``m.safetensors``, ``data.csv`` and a folder ``sub`` in ``root``."""
    params = random_params("full", 2, D, seed=1)
    pg.save(params, root / "m.safetensors")
    x = np.random.default_rng(0).normal(size=(12, D)) * 3
    (root / "data.csv").write_bytes(DATA[data_kind](x))
    (root / "sub").mkdir()
    return params, x


def run_main(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(args)
    finally:
        torch.set_num_threads(threads)
    return code, out.getvalue(), err.getvalue()


def assert_clean_error(err: str, command: str) -> None:
    """One line ``puregmm COMMAND: error: ...`` (after argparse's usage block, for bad usage)."""
    lines = err.splitlines()
    assert lines and lines[-1].startswith(f"puregmm {command}: error: "), err
    assert len(lines) == 1 or lines[0].startswith("usage: "), err
    assert "Traceback" not in err


def assert_whole_or_untouched(
    root: Path, before: dict[str, Any], code: int, err: str, command: str, target: Path, inputs: list[Path]
) -> None:
    """Exit 2: nothing changed. Exit 0: only the resolved target changed, and it is no input
    (nor another name of one). Never a temp file."""
    after = snapshot(root)
    assert not [k for k in after if k.endswith(".tmp")], sorted(after)
    assert code in (0, 2), err
    if code == 2:
        assert_clean_error(err, command)
        assert after == before
        return
    written = Path(os.path.realpath(target))
    assert written not in {Path(os.path.realpath(p)) for p in inputs}, f"{command} wrote over an input"
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert changed <= {str(written.relative_to(root))}, changed
    assert all(before[str(p.relative_to(root))] == after[str(p.relative_to(root))] for p in inputs)


# --- score and sample under every kind of output, data and argument --------------------------


def check_outputs(command: str, kind: str, data_kind: str, n: str, seed: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        root = Path(d).resolve()
        params, x = sandbox(root, data_kind)
        out = OUTPUTS[kind](root)
        inputs = [root / "m.safetensors"] + ([root / "data.csv"] if command == "score" else [])
        if command == "score":
            args = ["score", str(root / "m.safetensors"), str(root / "data.csv"), "--out", str(out)]
        else:
            args = ["sample", str(root / "m.safetensors"), n, "--seed", seed, "--out", str(out)]
        before = snapshot(root)
        code, _, err = run_main(args)
        assert_whole_or_untouched(root, before, code, err, command, out, inputs)
        if code != 0:
            return
        written = Path(os.path.realpath(out))
        if command == "sample":
            np.testing.assert_array_equal(np.load(written), pg.sample(params, int(n), key=int(seed))[0].numpy())
        else:
            table = np.loadtxt(written, delimiter=",", skiprows=1, ndmin=2)
            expected = pg.score_samples(params, torch.as_tensor(x))
            np.testing.assert_array_equal(table[:, 0], expected.numpy())  # %.17g round-trips float64


@pytest.mark.parametrize("command", ["score", "sample"])
@pytest.mark.parametrize("kind", sorted(OUTPUTS))
def test_every_kind_of_output_path(command: str, kind: str) -> None:
    check_outputs(command, kind, "good", "5", "3")


NUMBERS = st.one_of(  # N draws from these only beyond memory (refused) or up to 40 (fast)
    st.integers(-(2**70), 0).map(str),
    st.integers(2**40, 2**70).map(str),
    st.sampled_from(["0", "-1", "1e3", "nan", "inf", "", "--", "5.5", "٣", "1_000", "9" * 5000]),
    st.text(max_size=6),
)


@settings(max_examples=60)
@given(
    command=st.sampled_from(["score", "sample"]),
    kind=st.sampled_from(sorted(OUTPUTS)),
    data_kind=st.sampled_from(sorted(DATA)),
    n=st.one_of(st.integers(-3, 40).map(str), st.integers(2**40, 2**63).map(str), NUMBERS),
    seed=NUMBERS,
)
def test_generated_outputs_data_and_arguments(command: str, kind: str, data_kind: str, n: str, seed: str) -> None:
    check_outputs(command, kind, data_kind, n, seed)


FIT_DIRS: dict[str, Callable[[Path], Path]] = {
    "new folder": lambda r: r / "run",
    "new nested folder": lambda r: r / "a" / "b" / "run",
    "existing folder": lambda r: r / "sub",
    "a file": lambda r: _file(r / "plain"),
    "under a file": lambda r: _file(r / "plain") / "run",
    "model is a folder": lambda r: ((r / "sub" / "model.safetensors").mkdir(), r / "sub")[1],
    "report is a fifo": lambda r: (os.mkfifo(r / "sub" / "report.json"), r / "sub")[1],
    "model links elsewhere": lambda r: (_link(r / "sub", "model.safetensors", _file(r / "elsewhere")), r / "sub")[1],
    "report links to the data": lambda r: (_link(r / "sub", "report.json", r / "data.csv"), r / "sub")[1],
    "link to a folder": lambda r: _link(r, "link", r / "sub"),
}


@settings(max_examples=12)
@given(kind=st.sampled_from(sorted(FIT_DIRS)), data_kind=st.sampled_from(["good", "NaN row", "latin-1", "binary"]))
@example(kind="new nested folder", data_kind="NaN row")  # a failed fit removes every folder it made
def test_fit_output_folders(kind: str, data_kind: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        root = Path(d).resolve()
        sandbox(root, data_kind)
        out = FIT_DIRS[kind](root)
        before = snapshot(root)
        args = ["fit", str(root / "data.csv"), "-k", "2", "--max-steps", "3", "--out", str(out), "-q", "--no-plot"]
        code, _, err = run_main(args)
        after = snapshot(root)
        assert code in (0, 2), err
        assert not [k for k in after if k.endswith(".tmp")]
        if code == 2:
            assert_clean_error(err, "fit")
            assert after == before
            return
        folder = Path(os.path.realpath(out))
        assert pg.load(folder / "model.safetensors").n_components == 2
        assert json.loads((folder / "report.json").read_text())["K"] == 2
        outputs = {
            os.path.realpath(folder / name) for name in ("model.safetensors", "report.json", "checkpoint.safetensors")
        }
        for key in {k for k in set(before) | set(after) if before.get(k) != after.get(k)}:
            new_folder = key not in before and after[key][0] == "dir"
            assert new_folder or os.path.realpath(root / key) in outputs, key  # nothing else changed


# --- argument parsing never crashes ----------------------------------------------------------


@settings(max_examples=80)
@given(
    option=st.sampled_from(
        ["--threads", "--seed", "--max-steps", "--tol", "--n-init", "--batch-size", "--reg-covar", "-k"]
    ),
    value=NUMBERS,
)
@example(option="--tol", value="9223372036854775296")  # a float: rounds to 2**63, still a valid tol
def test_fit_options_parse_or_exit_2(option: str, value: str) -> None:
    """Every value either parses into the documented range or is a usage error (exit 2)."""
    args = ["fit", "d.csv", "--out", "run", *(["-k", "2"] if option != "-k" else []), option, value]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            ns = cli.build_parser().parse_args(args)
    except SystemExit as exc:
        assert exc.code == 2
        assert_clean_error(err.getvalue(), "fit")
        return
    attr = {"-k": "components"}.get(option, option.lstrip("-").replace("-", "_"))
    v = getattr(ns, attr)
    if v == "auto":
        return
    if option in ("--tol", "--reg-covar"):  # floats: finite, positive (tol) or non-negative (reg)
        assert isinstance(v, float) and math.isfinite(v) and (v > 0 if option == "--tol" else v >= 0)
        return
    assert isinstance(v, int) and -(2**63) <= v <= 2**63 - 1
    if option == "--threads":
        assert 1 <= v <= (os.cpu_count() or 1)


# --- data files of every shape ---------------------------------------------------------------


@settings(max_examples=100)
@given(
    content=st.one_of(
        st.binary(max_size=200),
        st.text(alphabet="0123456789.,-+eEnaif \t\n\"'#;\u00e9\x00", max_size=200).map(str.encode),
        st.text(max_size=60).map(lambda s: s.encode("utf-8", "surrogatepass")),
    ),
    suffix=st.sampled_from([".csv", ".tsv", ".npy"]),
    magic=st.booleans(),
)
def test_data_files_read_or_raise_value_error_naming_the_file(content: bytes, suffix: str, magic: bool) -> None:
    """Arbitrary bytes (with or without the .npy magic), text and unicode: an array or a
    ValueError that names the file, never another exception."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"input{suffix}"
        path.write_bytes((b"\x93NUMPY\x01\x00" if magic else b"") + content)
        try:
            arr = load_data(path)
        except ValueError as err:
            assert "input" + suffix in str(err), err
            return
        assert arr.ndim == 2 and arr.shape[0] >= 1 and arr.shape[1] >= 1 and arr.dtype.kind in "fiub"


# --- killed writers --------------------------------------------------------------------------

STALL = textwrap.dedent(
    """
    import os, sys, time
    stall_at, args = int(sys.argv[1]), sys.argv[2:]
    real_fsync, calls = os.fsync, [0]

    def fsync(fd):  # the file's data is complete in its temp file; stall before the rename
        calls[0] += 1
        real_fsync(fd)
        if calls[0] == stall_at:
            print("stalled", flush=True)
            time.sleep(120)

    os.fsync = fsync
    from puregmm.cli import main
    sys.exit(main(args))
    """
)


def kill_while_writing(stall_at: int, args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", STALL, str(stall_at), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        assert proc.stdout is not None
        lines = []
        while not lines or lines[-1] != "stalled":
            line = proc.stdout.readline()
            assert line, (
                f"the writer ended before fsync {stall_at}: {lines} {proc.stderr.read() if proc.stderr else ''}"
            )
            lines.append(line.strip())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("command", ["sample", "score"])
def test_killed_score_or_sample_keeps_the_old_output(tmp_path: Path, command: str) -> None:
    """SIGKILL once the new output is complete in its temp file but not yet renamed."""
    sandbox(tmp_path)
    out = tmp_path / ("s.npy" if command == "sample" else "s.csv")
    old = b"the previous run's output\n"
    out.write_bytes(old)
    extra = ["500"] if command == "sample" else [str(tmp_path / "data.csv")]
    kill_while_writing(1, [command, str(tmp_path / "m.safetensors"), *extra, "--out", str(out)])
    assert out.read_bytes() == old
    temps = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(temps) == 1 and temps[0].name.startswith(f".{out.name}.")  # complete, never renamed


@pytest.mark.parametrize("stall_at", [1, 3, 5])
def test_killed_fit_loses_no_file(tmp_path: Path, stall_at: int) -> None:
    """SIGKILL a fit while it writes its checkpoint (1), model (3) or report (5): every file in
    DIR is the previous run's or the new run's, complete."""
    sandbox(tmp_path)
    run = tmp_path / "run"
    base = ["fit", str(tmp_path / "data.csv"), "-k", "2", "--max-steps", "4", "--out", str(run), "-q", "--no-plot"]
    assert run_main([*base, "--seed", "0"])[0] == 0
    old = {p.name: p.read_bytes() for p in run.iterdir()}
    kill_while_writing(stall_at, [*base, "--seed", "1"])
    files = {p.name: p.read_bytes() for p in run.iterdir() if not p.name.endswith(".tmp")}
    assert set(files) == set(old)  # nothing lost
    expected_new = {1: set(), 3: {"checkpoint.safetensors"}, 5: {"checkpoint.safetensors", "model.safetensors"}}
    assert {n for n in files if files[n] != old[n]} == expected_new[stall_at]
    pg.load(run / "model.safetensors")
    json.loads((run / "report.json").read_text())
