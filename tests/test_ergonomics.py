"""The command explains itself: list, show, inspect, --version, typos, what a run prints."""
from __future__ import annotations

import re

import pandas as pd

from conftest import FAST, cli_here, dgrun, read_summary, train_here
from dgrun import __version__


def test_version_is_dgruns_and_a_mistyped_command_gets_a_suggestion(tmp_path):
    assert dgrun("--version").stdout.startswith(f"dgrun {__version__} (torch ")
    proc = dgrun("repotr", "multirun/x", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "unknown command 'repotr'" in proc.stderr
    assert "did you mean `dgrun report`?" in proc.stderr and list(tmp_path.iterdir()) == []
    help_text = dgrun("--help").stdout
    for command in ("dgrun report", "dgrun show", "dgrun list", "dgrun inspect", "dgrun slurm"):
        assert command in help_text


def test_list_names_every_choice_and_counts_model_parameters(capsys):
    out = cli_here(capsys, "list")[1]
    for choice in ("digits", "partial_labels", "inception", "warmup_cosine", "group_dro",
                   "simplicity_bias", "tensorboard", "zhang2017_fig1bc_digits", "robustness"):
        assert choice in out, choice
    assert "scikit-learn's 1,797 8x8 digits, shipped in its wheel" in out  # the YAML's words
    models = cli_here(capsys, "list", "model", "dataset=cifar10", "dataset.center_crop=28")[1]
    for name, count in (("mlp1", "1,209,866"), ("alexnet", "1,387,786"),
                        ("inception", "1,649,402"), ("mlp3", "1,735,178")):
        assert re.search(rf"{name}\s*│\s*{count}", models), name
    code, _, err = cli_here(capsys, "list", "model", "dataset=cifar10", "dataset.center_crop=40")
    assert code == 2 and "larger than the 32x32 images" in err


def test_inspect_shows_layers_shapes_and_the_total(capsys):
    out = cli_here(capsys, "inspect", "model=alexnet", "dataset=cifar10",
                   "dataset.center_crop=28")[1]
    assert re.search(r"features\.7\s*│\s*MaxPool2d\s*│\s*64x7x7", out)
    assert re.search(r"classifier\.1\s*│\s*Linear\s*│\s*384\s*│\s*1,204,608", out)
    assert "total: 1,387,786 parameters" in out
    code, _, err = cli_here(capsys, "inspect", "model=alexnet", "dataset=mnist1d")
    assert code == 2 and "cannot take vector data" in err


def test_show_a_run_and_a_sweep(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for seed in (0, 1):
        train_here(sweep / str(seed), f"seed={seed}", "trainer.max_epochs=2", *FAST,
                   "corruption=partial_labels", "corruption.prob=0.2")
    one = cli_here(capsys, "show", str(sweep / "1"))[1]
    assert "completed (max_epochs) at step 24" in one and "last 3 of 3 metrics rows" in one
    # The run's closing lines, as it printed them when it ended.
    from dgrun.probes.closing import closing_lines
    lines = closing_lines(read_summary(sweep / "1"))
    assert lines and all(line in one for line in lines)
    many = cli_here(capsys, "show", str(sweep))[1]
    assert "2 runs: 2 completed" in many
    assert len([line for line in many.splitlines() if "completed (max_epochs)" in line]) == 2
    code, _, err = cli_here(capsys, "show", str(tmp_path / "nope"))
    assert code == 2 and "does not exist" in err


def test_a_run_prints_its_config_and_ends_with_a_summary_unless_quiet(tmp_path):
    out = dgrun("trainer.max_epochs=2", f"hydra.run.dir={tmp_path / 'a'}", *FAST).stdout
    assert f"dgrun -> {tmp_path / 'a'}" in out and "optimizer: sgd" in out
    assert "completed (max_epochs) after 24 steps" in out and f"record: {tmp_path / 'a'}" in out
    quiet = dgrun("trainer.max_epochs=2", "quiet=true", f"hydra.run.dir={tmp_path / 'b'}",
                  *FAST).stdout
    assert "dgrun ->" not in quiet and "record:" not in quiet


def test_piped_report_keeps_whole_column_names_and_defaults_fill_swept_keys(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    train_here(sweep / "a", "trainer.max_epochs=1", *FAST)
    train_here(sweep / "b", "trainer.max_epochs=2", "seed=1", *FAST)
    out = cli_here(capsys, "report", str(sweep), "--html")[1]  # captured: not a terminal
    assert "steps to threshold" in out and "comp…" not in out and "ste…" not in out
    table = pd.read_csv(sweep / "report" / "runs.csv")
    assert table["seed"].tolist() == [0, 1]  # run a never set it: its default, not <NA>
    page = (sweep / "report" / "report.html").read_text()
    assert "<td>None</td>" not in page and "<NA>" not in page
    assert "Tight layout not applied" not in out

