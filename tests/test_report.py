"""`dgrun report`: run directories -> table, CSV, figures, HTML; the sweep-end callback.

Most tests build synthetic run directories by hand (what a run writes: .hydra/config.yaml,
.hydra/overrides.yaml, metrics.csv, summary.json); one runs a tiny real sweep end to end.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from dgrun import report, report_figures
from dgrun.callbacks import ReportCallback
from dgrun.errors import UserError

PNG = b"\x89PNG\r\n\x1a\n"
CHROMIUM = Path("/usr/bin/chromium")


# ---------------------------------------------------------------- synthetic run directories
def make_run(root: Path, name: str, *, prob: float, seed: int, model: str = "mlp1",
             status: str = "completed", summary: bool = True, metrics_rows: int = 6,
             test_acc: float = 0.9, reached: bool = True, error: str = None,
             transitions: dict = None, extra_overrides: tuple = ()) -> Path:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    config = {"seed": seed, "dataset": {"name": "digits"}, "model": {"name": model, "width": 8},
              "corruption": {"name": "partial_labels", "prob": float(prob),
                             "apply_to_test": True},
              "optimizer": {"name": "sgd", "lr": 0.01},
              "trainer": {"max_epochs": 10, "interpolation_threshold": 1.0,
                          "interpolation_loss": None}}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    overrides = ["corruption=partial_labels", f"corruption.prob={prob:g}", f"seed={seed}",
                 f"model={model}", "trainer.max_epochs=10", *extra_overrides]
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    rows = []
    for i in range(metrics_rows):
        acc = min(1.0, 0.5 + i * 0.1) if reached else 0.4 + i * 0.01
        rows.append({"step": i * 10, "epoch": float(i), "time_s": i * 0.5, "lr": 0.01,
                     "train_loss": 2.0 / (i + 1) * (1 + prob), "train_acc": acc,
                     "test_loss": 1.0, "test_acc": test_acc, "weight_norm": 3.0})
    if rows:
        pd.DataFrame(rows).to_csv(run / "metrics.csv", index=False)
    if summary:
        last = rows[-1] if rows and status != "running" else {}
        data = {"status": status, "stop_reason": {"completed": "interpolation" if reached
                                                  else "max_epochs",
                                                  "diverged": "non-finite loss"}.get(status),
                "steps": last.get("step", 0), "epochs": last.get("epoch"),
                "time_s": last.get("time_s", 0.0), "params": 1234,
                "final": {k: v for k, v in last.items()
                          if k not in ("step", "epoch", "time_s", "lr")},
                "interpolation": {"reached": reached and status != "running",
                                  "step": 50 if reached else None,
                                  "epoch": 5.0 if reached else None,
                                  "time_s": 2.5 + prob if reached else None},
                "seed": seed, "dataset": "digits", "model": model,
                "corruption": {"name": "partial_labels", "prob": float(prob)},
                "optimizer": "sgd", "versions": {"dgrun": "0.1.0"}}
        if error:
            data["error"] = error
        if transitions:
            data["transitions"] = transitions
        (run / "summary.json").write_text(json.dumps(data))
    return run


def build_sweep(root: Path) -> Path:
    """10 jobs: prob 0/0.5/1 x seeds 0,1 completed (prob 1 never fits), then one each of
    failed, no summary (crashed early or not started), diverged, running (killed mid-way)."""
    job = 0
    for prob in (0.0, 0.5, 1.0):
        for seed in (0, 1):
            make_run(root, str(job), prob=prob, seed=seed, reached=prob < 1.0,
                     test_acc=0.9 - 0.4 * prob + 0.02 * seed,
                     transitions={"memorization_step": 20 + job, "delay_ratio": 2.5}
                     if job == 0 else None)
            job += 1
    make_run(root, "6", prob=0.5, seed=2, status="failed", error="RuntimeError: boom")
    make_run(root, "7", prob=1.0, seed=2, summary=False, metrics_rows=3)
    make_run(root, "8", prob=1.0, seed=3, status="diverged", reached=False)
    make_run(root, "9", prob=0.0, seed=2, status="running", metrics_rows=4)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    return build_sweep(tmp_path / "multirun" / "2026-11-24" / "10-00-00")


def table_of(*paths: Path) -> pd.DataFrame:
    return report.build_table(report.find_run_dirs(list(paths)))[0]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("dgrun: error: ") and "; " in err
    return err


# ---------------------------------------------------------------- the table
def test_table_has_every_run_with_typed_swept_values(sweep):
    table = table_of(sweep.parents[1])  # a parent of the sweep works too
    assert list(table["run"]) == [str(i) for i in range(10)]  # natural order, none dropped
    for column in ("run_dir", "corruption.prob", "seed", "model", "trainer.max_epochs",
                   "dataset", "corruption", "prob", "status", "stop_reason", "steps", "epochs",
                   "time_s", "params", "final_train_acc", "final_test_acc", "final_train_loss",
                   "interpolation_reached", "interpolation_step", "interpolation_epoch",
                   "interpolation_time_s", "transitions_memorization_step",
                   "transitions_delay_ratio", "error"):
        assert column in table, column
    assert "versions" not in table and "final" not in table
    assert pd.api.types.is_float_dtype(table["prob"])
    assert table["corruption.prob"].tolist() == table["prob"].tolist()
    assert table["prob"].tolist()[:6] == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0]
    assert table["seed"].tolist() == [0, 1, 0, 1, 0, 1, 2, 2, 3, 2]
    assert set(table["dataset"]) == {"digits"} and set(table["model"]) == {"mlp1"}
    by_run = table.set_index("run")
    assert by_run.loc["3", "final_test_acc"] == pytest.approx(0.9 - 0.2 + 0.02)
    assert by_run.loc["0", "transitions_memorization_step"] == 20
    assert by_run.loc["0", "transitions_delay_ratio"] == 2.5
    assert by_run.loc["0", "interpolation_step"] == 50
    assert bool(by_run.loc["0", "interpolation_reached"])
    assert not by_run.loc["4", "interpolation_reached"]
    assert by_run.loc["4", "stop_reason"] == "max_epochs"
    assert list(by_run["status"]) == ["completed"] * 6 + ["failed", "unknown", "diverged",
                                                          "running"]
    assert by_run.loc["6", "error"] == "RuntimeError: boom"
    # unfinished runs report their numbers so far, from metrics.csv
    assert by_run.loc["7", "steps"] == 20 and by_run.loc["9", "steps"] == 30
    assert by_run.loc["9", "final_train_acc"] == pytest.approx(0.8)
    assert report.swept_columns(table, ["corruption", "corruption.prob", "seed"]) == ["prob"]


def test_a_damaged_summary_is_refused_naming_the_file(tmp_path):
    run = make_run(tmp_path, "0", prob=0.0, seed=0)
    (run / "summary.json").write_text("{")
    with pytest.raises(UserError, match=r"summary.json is damaged: not JSON .*move it aside"):
        table_of(tmp_path)


# ---------------------------------------------------------------- the command
def test_a_report_that_cannot_be_written_is_one_line_and_out_writes_elsewhere(tmp_path, capsys,
                                                                             monkeypatch):
    import errno

    run = make_run(tmp_path / "sweep", "0", prob=0.0, seed=0)
    (tmp_path / "sweep" / "report").write_text("")  # a file where the folder would go
    assert report.main([str(tmp_path / "sweep"), "--no-figures"]) == 2
    err = one_line_error(capsys)
    assert str(tmp_path / "sweep" / "report") in err and "pass --out DIR" in err

    def read_only(frame, path=None, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    with monkeypatch.context() as m:
        m.setattr(pd.DataFrame, "to_csv", read_only)
        assert report.main([str(run), "--out", str(tmp_path / "ro")]) == 2
    assert "Read-only file system; choose another --out DIR" in one_line_error(capsys)
    assert report.main([str(run), "--out", str(tmp_path / "out"), "--no-figures"]) == 0
    assert (tmp_path / "out" / "runs.csv").is_file()


def test_report_writes_csv_figures_and_lists_incomplete_runs(sweep, capsys):
    assert report.main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "4 of 10 runs did not complete" in out and "<NA>" not in out and "nan" not in out
    for line in ("6: failed (RuntimeError: boom)", "7: unknown (no summary.json",
                 "8: diverged (non-finite loss)", "9: running (unfinished, 30 steps so far)"):
        assert line in out, line
    folder = sweep / "report"
    csv = pd.read_csv(folder / "runs.csv")
    assert len(csv) == 10 and csv["status"].value_counts()["completed"] == 6
    for name in ("learning_curves", "threshold_vs_corruption", "test_error_vs_corruption"):
        png = folder / f"{name}.png"
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 5000, name


def test_parquet_when_available(sweep, tmp_path):
    pytest.importorskip("pyarrow")
    report.report([sweep], out=tmp_path / "out", figures=False)
    assert len(pd.read_parquet(tmp_path / "out" / "runs.parquet")) == 10


def test_figures_average_seeds_and_keep_lines_per_parameter(tmp_path):
    root = tmp_path / "sweep"
    job = 0
    for model, base in (("mlp1", 0.8), ("mlp3", 0.9)):
        for prob in (0.0, 1.0):
            for seed in (0, 1):
                make_run(root, str(job), prob=prob, seed=seed, model=model,
                         test_acc=base - 0.5 * prob + 0.02 * seed)
                job += 1
    table, curves, keys = report.build_table(report.find_run_dirs([root]))
    swept = report.swept_columns(table, keys)
    assert swept == ["prob", "model"]
    figures, skipped = report_figures.build(table, curves, swept, x="prob",
                                            y="final_test_acc", hue="model")
    by_name = {f.name: f for f in figures}
    assert set(by_name) == {"learning_curves", "threshold_vs_corruption",
                            "test_error_vs_corruption", "final_test_acc_vs_prob"} and not skipped
    (error_panel,) = by_name["test_error_vs_corruption"].panels
    lines = {line.label: line for line in error_panel.lines}
    assert set(lines) == {"model=mlp1", "model=mlp3"}
    mlp1 = lines["model=mlp1"]
    assert mlp1.x == [0.0, 1.0] and mlp1.count == [2, 2]
    assert mlp1.mean == pytest.approx([1 - 0.81, 1 - 0.31])
    assert mlp1.lo == pytest.approx([1 - 0.82, 1 - 0.32])
    assert mlp1.hi == pytest.approx([1 - 0.80, 1 - 0.30])
    curve_labels = [line.label for line in by_name["learning_curves"].panels[0].lines]
    assert curve_labels == ["model=mlp1, prob=0 (2 runs)", "model=mlp1, prob=1 (2 runs)",
                            "model=mlp3, prob=0 (2 runs)", "model=mlp3, prob=1 (2 runs)"]
    assert report.main([str(root), "--x", "prob", "--y", "final_test_acc",
                        "--hue", "model"]) == 0
    png = root / "report" / "final_test_acc_vs_prob.png"
    assert png.read_bytes()[:8] == PNG and png.stat().st_size > 5000


def test_figures_that_do_not_apply_are_skipped_with_a_note(tmp_path, capsys):
    for seed in (0, 1):
        make_run(tmp_path / "s", str(seed), prob=0.0, seed=seed)
    assert report.main([str(tmp_path / "s"), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "note: threshold_vs_corruption.png, test_error_vs_corruption.png skipped" in out
    assert "all 2 runs completed" in out
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["learning_curves.png"]


@pytest.mark.parametrize("argv, expected", [
    (["{root}/nope"], "does not exist"),
    (["{root}/empty"], "no run directories under"),
    (["{root}/sweep", "--x", "probb"], "did you mean prob?"),
    (["{root}/sweep", "--y", "final_test_acc"], "--y needs --x"),
    (["{root}/sweep", "--x", "prob", "--y", "status"], "is not numeric"),
    (["{root}/sweep", "--bogus"], "unrecognized arguments"),
])
def test_errors_are_one_line_exit_2(tmp_path, capsys, argv, expected):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    make_run(tmp_path / "sweep", "0", prob=0.0, seed=0)
    argv = [a.format(root=tmp_path) for a in argv]
    assert report.main(argv) == 2
    assert expected in one_line_error(capsys)
    assert not (tmp_path / "nope" / "report").exists()


# ---------------------------------------------------------------- HTML
def test_html_needs_plotly(sweep, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "plotly", None)  # import plotly -> ImportError
    assert report.main([str(sweep), "--html"]) == 2
    assert "pip install 'dgrun[report]'" in one_line_error(capsys)


@pytest.fixture(scope="module")
def html_report(tmp_path_factory) -> Path:
    pytest.importorskip("plotly")
    sweep = build_sweep(tmp_path_factory.mktemp("html") / "sweep")
    assert report.main([str(sweep), "--html", "--x", "prob", "--y", "final_test_acc"]) == 0
    return sweep / "report" / "report.html"


def test_html_is_self_contained_with_the_traces(html_report):
    page = html_report.read_text()
    assert re.search(r"plotly\.js v\d", page)  # the library itself, inline
    assert not re.search(r"<script[^>]*\bsrc=", page)  # nothing fetched from the network
    for trace in ('"name":"prob=0 (3 runs)"', '"name":"prob=0.5 (3 runs)"', '"name":"all runs"'):
        assert trace in page, trace
    for div in ("learning_curves", "threshold_vs_corruption", "test_error_vs_corruption",
                "final_test_acc_vs_prob"):
        assert f'id="{div}"' in page
    assert "RuntimeError: boom" in page  # the runs table


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt install chromium)")
def test_html_renders_in_headless_chromium(html_report, tmp_path):
    result = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr",
         "--v=0", "--dump-dom", html_report.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count('class="main-svg"') >= 4  # plotly drew every chart
    assert "Uncaught" not in result.stderr, result.stderr[-2000:]


# ---------------------------------------------------------------- the sweep-end callback
def job_config(sweep_dir: Path):
    return OmegaConf.create({"hydra": {"mode": "MULTIRUN", "sweep": {"dir": str(sweep_dir)}}})


def test_callback_reports_when_the_sweep_succeeded(sweep, capsys):
    callback = ReportCallback()
    for job in range(2):
        callback.on_job_end(job_config(sweep), JobReturn(overrides=[f"seed={job}"],
                                                         status=JobStatus.COMPLETED))
    callback.on_multirun_end(job_config(sweep))
    assert (sweep / "report" / "runs.csv").exists()
    assert "4 of 10 runs did not complete" in capsys.readouterr().out


def test_callback_says_how_to_report_by_hand_when_a_job_failed(sweep, caplog):
    callback = ReportCallback()
    failed = JobReturn(overrides=["seed=2"], status=JobStatus.FAILED,
                       _return_value=RuntimeError("boom"))
    with caplog.at_level(logging.WARNING, logger="dgrun"):
        callback.on_job_end(job_config(sweep), failed)
        callback.on_multirun_end(job_config(sweep))
    assert f"dgrun report {sweep}" in caplog.records[0].getMessage()
    assert "seed=2 failed (RuntimeError: boom)" in caplog.records[0].getMessage()
    assert f"1 job(s) failed; no report made: run `dgrun report {sweep}`" in caplog.text
    assert not (sweep / "report").exists()


# ---------------------------------------------------------------- end to end
def test_real_sweep_then_report(tmp_path):
    dgrun = shutil.which("dgrun", path=os.path.dirname(sys.executable)) or "dgrun"
    sweep_dir = tmp_path / "sweep"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    run = subprocess.run(
        [dgrun, "-m", "corruption=partial_labels", "corruption.prob=0,1.0",
         "trainer.max_epochs=3", "trainer.progress=none", "threads=1", "device=cpu",
         f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (sweep_dir / "report" / "runs.csv").exists()  # made by the config's callback
    made = subprocess.run([dgrun, "report", str(sweep_dir), "--out", str(tmp_path / "out"),
                           "--x", "prob", "--y", "final_train_loss"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert made.returncode == 0, made.stderr[-3000:]
    assert "all 2 runs completed" in made.stdout
    # 3 epochs fit neither: no test error at the threshold to plot (Fig. 1c), and both are
    # listed as runs that did not fit.
    assert "2 of 2 runs did not reach the interpolation threshold" in made.stdout
    assert "test_error_vs_corruption.png skipped" in made.stdout
    table = pd.read_csv(tmp_path / "out" / "runs.csv")
    assert table["prob"].tolist() == [0.0, 1.0] and table["steps"].tolist() == [36, 36]
    assert set(table["status"]) == {"completed"} and table["final_test_acc"].notna().all()
    for name in ("learning_curves", "final_train_loss_vs_prob"):
        assert (tmp_path / "out" / f"{name}.png").read_bytes()[:8] == PNG
    assert not (tmp_path / "out" / "test_error_vs_corruption.png").exists()
