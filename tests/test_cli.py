"""The command line and its data readers: in-process for breadth, subprocesses for real exit codes."""

from __future__ import annotations

import csv
import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch

import puregmm as pg
from puregmm import cli
from puregmm.data import load_data
from puregmm.demo import CLUSTERS, demo_data, write_points

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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
    """A model fitted by the CLI on ``two_blobs()``, shared by the score/sample tests."""
    root = tmp_path_factory.mktemp("model")
    data = write_csv(root / "data.csv", two_blobs())
    assert (
        cli.main(["fit", str(data), "-k", "2", "--max-steps", "40", "--out", str(root / "run"), "-q", "--no-plot"]) == 0
    )
    return root / "run" / "model.safetensors"


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "puregmm", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout
    )


def assert_clean_usage_error(done: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    for f in fragments:
        assert f in done.stderr, done.stderr


# --- data readers ----------------------------------------------------------------------------


def test_csv_tsv_npy_readers(tmp_path: Path) -> None:
    x = two_blobs(10, 3)
    np.savetxt(tmp_path / "h.csv", x, delimiter=",", header="a,b,c", comments="", fmt="%.17g")
    np.savetxt(tmp_path / "n.csv", x, delimiter=",", fmt="%.17g")
    np.savetxt(tmp_path / "t.tsv", x, delimiter="\t", header="a\tb\tc", comments="", fmt="%.17g")
    for name in ("h.csv", "n.csv", "t.tsv"):
        np.testing.assert_array_equal(load_data(tmp_path / name), x)
    with open(tmp_path / "q.csv", "w", newline="") as f:
        csv.writer(f, quoting=csv.QUOTE_ALL).writerows([["a", "b"], ["1.5", "2"], ["3", "-4e2"]])
    np.testing.assert_array_equal(load_data(tmp_path / "q.csv"), [[1.5, 2.0], [3.0, -400.0]])
    np.save(tmp_path / "x.npy", x.astype(np.float32))
    arr = load_data(tmp_path / "x.npy")
    assert isinstance(arr, np.memmap) and arr.dtype == np.float32 and arr.shape == (10, 3)
    np.save(tmp_path / "v.npy", np.arange(5))
    assert load_data(tmp_path / "v.npy").shape == (5, 1)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("s.csv", "x,label,y\n1,cat,2\n3,dog,4\n", "column 'label' (column 2) is not numeric (line 2 holds 'cat')"),
        ("e.csv", "x,y\n1,2\n3,\n", "column 'y' (column 2) is not numeric (line 3 holds an empty field)"),
        ("r.csv", "1,2\n3,4,5\n", "line 2 has 3 fields, expected 2"),
        ("z.csv", "", "is empty"),
        ("o.csv", "a,b\n", "has a header but no data rows"),
        ("u.txt", "1,2\n", "expected one of"),
    ],
)
def test_bad_text_files_name_the_problem(tmp_path: Path, name: str, content: str, message: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_data(tmp_path / name)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("x,y\n1,2\nd\u00e9j\u00e0,3\n".encode("latin-1"), "not UTF-8 text (it holds the byte 0xe9)"),
        (b"\x80\x93NUMPY\x01\x00garbage", "not UTF-8 text (it holds the byte 0x80)"),
        (b"1," + b"9" * 200_000 + b"\n", "not a readable CSV/TSV file (field larger than field limit"),
    ],
)
def test_binary_and_latin1_text_files_are_named(tmp_path: Path, content: bytes, message: str) -> None:
    """Issue 14 item 19: the error names the file and the likely cause, not only the codec."""
    path = tmp_path / "d.csv"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"DATA '.*d\.csv' is " + message.replace("(", r"\(").replace(")", r"\)")):
        load_data(path)


def test_a_quoted_header_over_two_lines_is_skipped_whole(tmp_path: Path) -> None:
    """The header is the first CSV record, however many lines it spans (not the first line)."""
    (tmp_path / "q.csv").write_text('"a\nlong name",b\n1,2\n3,4\n')
    np.testing.assert_array_equal(load_data(tmp_path / "q.csv"), [[1.0, 2.0], [3.0, 4.0]])
    (tmp_path / "blank.csv").write_text("\n\nx,y\n1,2\n3,a\n")
    with pytest.raises(ValueError, match=r"column 'y' \(column 2\) is not numeric \(line 5 holds 'a'\)"):
        load_data(tmp_path / "blank.csv")


def test_bad_npy_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_data(tmp_path / "missing.npy")
    np.save(tmp_path / "c.npy", np.ones((2, 2, 2)))
    with pytest.raises(ValueError, match=r"2-D array \[N, D\]; got shape \(2, 2, 2\)"):
        load_data(tmp_path / "c.npy")
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"not a readable \.npy file"):  # never unpickled
        load_data(tmp_path / "o.npy")
    (tmp_path / "g.npy").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"not a readable \.npy file"):
        load_data(tmp_path / "g.npy")


def test_parquet_needs_pyarrow(tmp_path: Path) -> None:
    path = tmp_path / "x.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        path.write_bytes(b"PAR1")
        with pytest.raises(ValueError, match="needs pyarrow, which is not installed; run `pip install pyarrow`"):
            load_data(path)
        return
    pq.write_table(pa.table({"a": [1.0, 2.0], "b": [3, 4]}), path)
    np.testing.assert_array_equal(load_data(path), [[1.0, 3.0], [2.0, 4.0]])
    pq.write_table(pa.table({"a": [1.0, 2.0], "name": ["x", "y"]}), path)
    with pytest.raises(ValueError, match="column 'name' is not numeric"):
        load_data(path)


# --- fit -------------------------------------------------------------------------------------


def test_fit_writes_model_report_and_picture(tmp_path: Path, csv_data: tuple[Path, np.ndarray], capsys) -> None:
    data, x = csv_data
    run = tmp_path / "out"
    code = cli.main(["fit", str(data), "-k", "2", "--family", "diagonal", "--max-steps", "40", "--out", str(run), "-q"])
    assert code == 0
    assert "fit: family=diagonal K=2" in capsys.readouterr().out
    params = pg.load(run / "model.safetensors")
    assert (params.family, params.n_components, params.dtype) == ("diagonal", 2, torch.float64)
    report = json.loads((run / "report.json").read_text())
    xt = torch.as_tensor(x)
    assert report["family"] == "diagonal" and report["K"] == 2 and report["N"] == 120 and report["method"] == "em"
    assert report["loss"] == pytest.approx(float(pg.loss(params, xt)), rel=1e-12)
    assert report["bic"] == pytest.approx(float(pg.bic(params, xt)), rel=1e-12)
    assert report["aic"] == pytest.approx(float(pg.aic(params, xt)), rel=1e-12)
    assert report["n_steps"] <= 40 and isinstance(report["converged"], bool) and report["n_resets"] >= 0
    assert report["seconds"] > 0 and {"torch", "puregmm", "numpy", "python"} <= set(report["versions"])
    assert (run / "fit.png").read_bytes()[:8] == PNG_MAGIC


def test_fit_em_matches_the_library(tmp_path: Path, csv_data: tuple[Path, np.ndarray]) -> None:
    data, x = csv_data
    assert cli.main(["fit", str(data), "-k", "2", "--method", "em", "--seed", "3", "--out", str(tmp_path), "-q"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    expected = pg.fit(torch.as_tensor(x), 2, "full", method="em", key=3)
    assert report["method"] == "em" and report["n_steps"] == expected.n_steps
    assert report["loss"] == pytest.approx(float(expected.loss), rel=1e-12)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-k", "500"], "n_components=500 is more than the number of samples N=120"),
        (["-k", "2", "--resume"], "no checkpoint at"),
        (["-k", "2", "--method", "em", "--batch-size", "10"], "apply to method='gd' only"),
    ],
)
def test_fit_usage_errors_exit_2(tmp_path: Path, csv_data, capsys, args: list[str], message: str) -> None:
    assert cli.main(["fit", str(csv_data[0]), *args, "--out", str(tmp_path / "o"), "-q"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_fit_bad_data_exits_2(tmp_path: Path, capsys) -> None:
    x = two_blobs(20)
    x[7, 1] = np.nan
    np.save(tmp_path / "nan.npy", x)
    assert cli.main(["fit", str(tmp_path / "nan.npy"), "-k", "2", "--out", str(tmp_path / "o")]) == 2
    assert "data holds NaN at index (7, 1)" in capsys.readouterr().err  # fit's missing="raise"
    (tmp_path / "file").write_text("")
    assert cli.main(["fit", str(tmp_path / "nan.npy"), "-k", "2", "--out", str(tmp_path / "file")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert cli.main(["fit", str(tmp_path / "x.csv"), "-k", "2", "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    for bad in (["-k", "0"], ["-k", "two"], ["-k", "2", "--family", "round"], ["-k", "2", "--tol", "-1"]):
        assert cli.main(["fit", str(tmp_path / "nan.npy"), *bad, "--out", str(tmp_path / "o")]) == 2
        assert "usage: puregmm fit" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written for bad input


def test_unexpected_errors_exit_1_with_traceback(tmp_path: Path, csv_data, capsys, monkeypatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("kaboom")

    monkeypatch.setattr(pg, "fit", broken)
    assert cli.main(["fit", str(csv_data[0]), "-k", "2", "--out", str(tmp_path / "o"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "kaboom" in err and "unexpected error" in err


class Selection(NamedTuple):
    table: list[dict[str, Any]]
    params: pg.GMMParams


def test_auto_uses_pg_select_when_it_exists(tmp_path: Path, csv_data, monkeypatch) -> None:
    """The wiring of ``--components auto``, with a stand-in for pg.select until it lands."""
    data, _ = csv_data
    calls: dict[str, Any] = {}

    def fake_select(x, n_components, families, criterion, n_init, key, progress):  # pg.select's documented arguments
        calls.update(ks=list(n_components), families=families, criterion=criterion, key=key)
        fits = {k: pg.fit(x, k, families[0], method="em", key=key) for k in n_components}
        table = [
            {"family": families[0], "K": k, "BIC": float(pg.bic(f.params, x)), "converged": f.converged, "n_steps": 7}
            for k, f in fits.items()
        ]
        best = min(table, key=lambda r: r["BIC"])
        return Selection(table, fits[best["K"]].params)

    if not hasattr(pg, "select"):
        monkeypatch.setattr(pg, "select", fake_select, raising=False)
    code = cli.main(
        ["fit", str(data), "-k", "auto", "--max-components", "4", "--seed", "5", "--out", str(tmp_path), "-q"]
    )
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["K"] == 2 and report["components"] == "auto"
    if calls:  # the stand-in ran
        assert calls == {"ks": [1, 2, 3, 4], "families": ("full",), "criterion": "bic", "key": 5}
        assert [r["K"] for r in report["selection"]] == [1, 2, 3, 4] and report["n_steps"] == 7
    assert (tmp_path / "fit.png").read_bytes()[:8] == PNG_MAGIC


def test_resume_is_passed_to_fit_once_it_checkpoints(tmp_path: Path, csv_data, monkeypatch) -> None:
    """The wiring of ``--resume``, with a stand-in fit that takes checkpoint/resume."""
    real_fit = pg.fit
    seen: list[dict[str, Any]] = []

    def fit_with_checkpoints(*args: Any, checkpoint: Any = None, resume: Any = None, **kwargs: Any) -> Any:
        seen.append({"checkpoint": checkpoint, "resume": resume})
        if checkpoint is not None:
            Path(checkpoint).write_bytes(b"stand-in")
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(pg, "fit", fit_with_checkpoints)
    base = ["fit", str(csv_data[0]), "-k", "2", "--max-steps", "5", "--out", str(tmp_path), "-q", "--no-plot"]
    assert cli.main(base) == 0
    assert cli.main([*base, "--resume"]) == 0
    ckpt = str(tmp_path / "checkpoint.safetensors")
    assert seen == [{"checkpoint": ckpt, "resume": None}, {"checkpoint": ckpt, "resume": ckpt}]
    assert not (tmp_path / "fit.png").exists()


# --- score and sample ------------------------------------------------------------------------


def test_score_matches_the_library(tmp_path: Path, model: Path, csv_data, capsys) -> None:
    data, x = csv_data
    out = tmp_path / "scores.csv"
    assert cli.main(["score", str(model), str(data), "--out", str(out)]) == 0
    assert "score: 120 rows" in capsys.readouterr().out
    table = np.loadtxt(out, delimiter=",", skiprows=1)
    assert out.read_text().splitlines()[0] == "log_prob,component"
    params = pg.load(model)
    np.testing.assert_allclose(table[:, 0], pg.score_samples(params, torch.as_tensor(x)).numpy(), rtol=1e-15)
    np.testing.assert_array_equal(table[:, 1], pg.predict(params, torch.as_tensor(x)).numpy())
    assert cli.main(["score", str(model), str(data)]) == 0  # to stdout
    lines = capsys.readouterr().out.splitlines()
    assert lines == out.read_text().splitlines()


def test_score_bad_input_exits_2(tmp_path: Path, model: Path, capsys) -> None:
    np.save(tmp_path / "d3.npy", two_blobs(10, 3))
    assert cli.main(["score", str(model), str(tmp_path / "d3.npy")]) == 2
    assert "has D=3 columns but the model has D=2" in capsys.readouterr().err
    x = two_blobs(10)
    x[4, 0] = np.inf
    np.save(tmp_path / "inf.npy", x)
    assert cli.main(["score", str(model), str(tmp_path / "inf.npy")]) == 2
    assert "first bad rows: [4]" in capsys.readouterr().err
    assert cli.main(["score", str(tmp_path / "none.safetensors"), str(tmp_path / "inf.npy")]) == 2
    assert "MODEL" in capsys.readouterr().err


def test_sample_matches_the_library(tmp_path: Path, model: Path, capsys) -> None:
    out = tmp_path / "s.npy"
    assert cli.main(["sample", str(model), "50", "--seed", "4", "--out", str(out)]) == 0
    expected, _ = pg.sample(pg.load(model), 50, key=4)
    np.testing.assert_array_equal(np.load(out), expected.numpy())
    assert cli.main(["sample", str(model), "0", "--out", str(out)]) == 2
    assert "positive integer" in capsys.readouterr().err


def test_help_for_every_command(capsys) -> None:
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(c in text for c in ("fit", "score", "sample", "demo", "Exit codes"))
    for command, needle in (("fit", "report.json"), ("score", "log_prob"), ("sample", "N"), ("demo", "five")):
        assert cli.main([command, "--help"]) == 0
        assert needle in capsys.readouterr().out
    assert cli.main([]) == 2
    assert "required" in capsys.readouterr().err


# --- real processes --------------------------------------------------------------------------


def test_demo_in_a_subprocess(tmp_path: Path) -> None:
    done = run_cli("demo", "--out", str(tmp_path / "demo.png"), "--save-data", str(tmp_path / "p.csv"), "--quiet")
    assert done.returncode == 0, done.stderr
    assert "final loss" in done.stdout
    assert (tmp_path / "demo.png").read_bytes()[:8] == PNG_MAGIC
    points = load_data(tmp_path / "p.csv")
    assert points.shape == (1500, 2)
    np.testing.assert_allclose(points, demo_data().numpy(), rtol=1e-6)


def test_demo_data_is_five_clusters(tmp_path: Path) -> None:
    x = demo_data(n_per_cluster=2000, seed=1, dtype=torch.float64)
    for i, (centre, sd, _) in enumerate(CLUSTERS):
        part = x[i * 2000 : (i + 1) * 2000]
        torch.testing.assert_close(part.mean(0), torch.tensor(centre, dtype=torch.float64), atol=0.1, rtol=0)
        evals = torch.linalg.eigvalsh(torch.cov(part.T))
        torch.testing.assert_close(evals.sqrt(), torch.tensor(sorted(sd), dtype=torch.float64), rtol=0.06, atol=0)
    assert torch.equal(demo_data(seed=3), demo_data(seed=3))
    with pytest.raises(ValueError, match=r"must end in \.csv or \.npy"):
        write_points(x, tmp_path / "p.txt")


def test_console_script_fit_then_tampered_model(tmp_path: Path, csv_data) -> None:
    script = shutil.which("puregmm", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the puregmm console script is not installed in this environment")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [script, "fit", str(csv_data[0]), "-k", "2", "--max-steps", "30", "--threads", "1", "--out", str(tmp_path)]
    done = subprocess.run([*args, "-q"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert {p.name for p in tmp_path.iterdir()} >= {"model.safetensors", "report.json", "fit.png"}
    model = tmp_path / "model.safetensors"
    blob = bytearray(model.read_bytes())
    blob[30] ^= 0x01  # flip a header byte
    model.write_bytes(bytes(blob))
    assert_clean_usage_error(run_cli("score", str(model), str(csv_data[0])), "puregmm score: error:")


def test_bad_data_file_in_a_subprocess(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("x,colour\n1,red\n2,blue\n")
    done = run_cli("fit", str(bad), "-k", "2", "--out", str(tmp_path / "o"))
    assert_clean_usage_error(done, "column 'colour' (column 2) is not numeric")
    assert done.stderr.count("\n") == 1  # one message line


def test_resume_end_to_end_once_fit_checkpoints(tmp_path: Path, csv_data) -> None:
    """A fit stopped at 10 steps and resumed to 20 ends where an uninterrupted 20-step fit does."""
    if "resume" not in inspect.signature(pg.fit).parameters:
        pytest.skip("pg.fit has no checkpoint support yet")
    data = str(csv_data[0])
    common = ["fit", data, "-k", "2", "--method", "gd", "--tol", "1e-30", "-q", "--no-plot", "--checkpoint-every", "5"]
    assert cli.main([*common, "--max-steps", "20", "--out", str(tmp_path / "full")]) == 0
    assert cli.main([*common, "--max-steps", "10", "--out", str(tmp_path / "part")]) == 0
    assert (tmp_path / "part" / cli.CHECKPOINT).is_file()
    assert cli.main([*common, "--max-steps", "20", "--out", str(tmp_path / "part"), "--resume"]) == 0
    a, b = pg.load(tmp_path / "full" / "model.safetensors"), pg.load(tmp_path / "part" / "model.safetensors")
    for name in ("logits", "means", "scale"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    report = json.loads((tmp_path / "part" / "report.json").read_text())
    assert report["n_steps"] == 20
