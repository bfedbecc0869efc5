"""benchmarks/whole_process.py's accuracy check: a plain script counts as doing dgrun's work only
if it reproduces every accuracy it writes, at the same steps (metrics files written here, no
training)."""
from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def same_numbers():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("whole_process",
                                                      ROOT / "benchmarks" / "whole_process.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module.same_numbers


def metrics(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir()
    with open(folder / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder


# dgrun's rows: float32 accuracies, a group column, and a probe column blank on most rows.
DGRUN = [{"step": 0, "train_acc": 0.4934276938438415, "test_acc": 0.4610244929790497,
          "test_acc_y_1_color_red": 1.0, "dfr_test_acc": 0.8886414170265198},
         {"step": 1, "train_acc": 0.504550039768219, "test_acc": 0.4699331820011139,
          "test_acc_y_1_color_red": 0.952380955, "dfr_test_acc": ""}]
# The plain script's: exact fractions (488/989, 207/449, ...), no dfr column.
PLAIN = [{"step": 0, "train_acc": 488 / 989, "test_acc": 207 / 449,
          "test_acc_y_1_color_red": 1.0},
         {"step": 1, "train_acc": 499 / 989, "test_acc": 211 / 449,
          "test_acc_y_1_color_red": 100 / 105}]


def test_the_same_accuracies_pass_and_a_probe_the_plain_script_lacks_is_ignored(
        same_numbers, tmp_path):
    assert same_numbers(metrics(tmp_path / "dgrun", DGRUN), metrics(tmp_path / "plain", PLAIN))


@pytest.mark.parametrize("change", ["group column off", "test_acc off", "no test_acc",
                                    "a column dgrun lacks", "a step missing"])
def test_any_difference_fails(same_numbers, tmp_path, change):
    plain = [dict(r) for r in PLAIN]
    if change == "group column off":
        plain[1]["test_acc_y_1_color_red"] += 1e-5
    elif change == "test_acc off":
        plain[0]["test_acc"] += 1 / 449
    elif change == "no test_acc":
        plain = [{k: v for k, v in r.items() if k != "test_acc"} for r in plain]
    elif change == "a column dgrun lacks":
        plain = [{**r, "val_acc": 0.5} for r in plain]
    else:
        plain = plain[:1]
    assert not same_numbers(metrics(tmp_path / "dgrun", DGRUN), metrics(tmp_path / "plain", plain))


def test_an_unknown_case_is_refused_in_one_line():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "whole_process.py"),
                           "--cases", "simplicity_bias -nothing"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "unknown case 'simplicity_bias -nothing'" in proc.stderr
    assert "simplicity_bias -dfr" in proc.stderr and "robustness -robustness" in proc.stderr
