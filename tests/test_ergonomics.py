"""The command explains itself: list, show, inspect, --version, typos, what a run prints."""
from __future__ import annotations

import re

import pandas as pd

from conftest import FAST, dgrun
from dgrun import __version__


def test_version_is_dgruns_and_a_mistyped_command_gets_a_suggestion(tmp_path):
    assert dgrun("--version").stdout.startswith(f"dgrun {__version__} (torch ")
    proc = dgrun("repotr", "multirun/x", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "unknown command 'repotr'" in proc.stderr
    assert "did you mean `dgrun report`?" in proc.stderr and list(tmp_path.iterdir()) == []
    help_text = dgrun("--help").stdout
    for command in ("dgrun report", "dgrun show", "dgrun list", "dgrun inspect", "dgrun slurm"):
        assert command in help_text


def test_list_names_every_choice_and_counts_model_parameters():
    out = dgrun("list").stdout
    for choice in ("digits", "partial_labels", "inception", "warmup_cosine", "group_dro",
                   "simplicity_bias", "tensorboard", "zhang2017_fig1bc_digits", "robustness"):
        assert choice in out, choice
    assert "scikit-learn's 1,797 8x8 digits, shipped in its wheel" in out  # the YAML's words
    models = dgrun("list", "model", "dataset=cifar10", "dataset.center_crop=28").stdout
    for name, count in (("mlp1", "1,209,866"), ("alexnet", "1,387,786"),
                        ("inception", "1,649,402"), ("mlp3", "1,735,178")):
        assert re.search(rf"{name}\s*│\s*{count}", models), name
    bad = dgrun("list", "model", "dataset=cifar10", "dataset.center_crop=40", check=False)
    assert bad.returncode == 2 and "larger than the 32x32 images" in bad.stderr


def test_inspect_shows_layers_shapes_and_the_total():
    out = dgrun("inspect", "model=alexnet", "dataset=cifar10", "dataset.center_crop=28").stdout
    assert re.search(r"features\.7\s*│\s*MaxPool2d\s*│\s*64x7x7", out)
    assert re.search(r"classifier\.1\s*│\s*Linear\s*│\s*384\s*│\s*1,204,608", out)
    assert "total: 1,387,786 parameters" in out
    bad = dgrun("inspect", "model=alexnet", "dataset=mnist1d", check=False)
    assert bad.returncode == 2 and "cannot take vector data" in bad.stderr


def test_show_a_run_and_a_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    dgrun("-m", "seed=0,1", "trainer.max_epochs=2", f"hydra.sweep.dir={sweep}", *FAST)
    one = dgrun("show", str(sweep / "1")).stdout
    assert "completed (max_epochs) at step 24" in one and "last 3 of 3 metrics rows" in one
    many = dgrun("show", str(sweep)).stdout
    assert "2 runs: 2 completed" in many
    assert len([line for line in many.splitlines() if "completed (max_epochs)" in line]) == 2
    missing = dgrun("show", str(tmp_path / "nope"), check=False)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_a_run_prints_its_config_and_ends_with_a_summary_unless_quiet(tmp_path):
    out = dgrun("trainer.max_epochs=2", f"hydra.run.dir={tmp_path / 'a'}", *FAST).stdout
    assert f"dgrun -> {tmp_path / 'a'}" in out and "optimizer: sgd" in out
    assert "completed (max_epochs) after 24 steps" in out and f"record: {tmp_path / 'a'}" in out
    quiet = dgrun("trainer.max_epochs=2", "quiet=true", f"hydra.run.dir={tmp_path / 'b'}",
                  *FAST).stdout
    assert "dgrun ->" not in quiet and "record:" not in quiet


def test_piped_report_keeps_whole_column_names_and_defaults_fill_swept_keys(tmp_path):
    sweep = tmp_path / "sweep"
    dgrun("-m", "trainer.max_epochs=1", f"hydra.sweep.dir={sweep / 'a'}", *FAST)
    dgrun("-m", "trainer.max_epochs=2", "seed=1", f"hydra.sweep.dir={sweep / 'b'}", *FAST)
    out = dgrun("report", str(sweep), "--html").stdout  # not a terminal: piped
    assert "steps to threshold" in out and "comp…" not in out and "ste…" not in out
    table = pd.read_csv(sweep / "report" / "runs.csv")
    assert table["seed"].tolist() == [0, 1]  # run a never set it: its default, not <NA>
    page = (sweep / "report" / "report.html").read_text()
    assert "<td>None</td>" not in page and "<NA>" not in page
    assert "Tight layout not applied" not in out

