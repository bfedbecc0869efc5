"""Every command of the README's Phenomena table, run as written, shows what its "what you see"
column says. The numbers the column promises are read from the README itself, so the README
cannot drift from what the presets do (each run ~5-20 s of training on one thread)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import FAST, ROOT, read_metrics, read_summary, train_here


def phenomena_table() -> list[tuple[str, str]]:
    """(command, what you see) for each row of the README's Phenomena table."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Phenomena", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].startswith("`dgrun "):
            rows.append((cells[0].strip("`"), cells[1]))
    return rows


def number(pattern: str, text: str) -> float:
    found = re.search(pattern, text)
    assert found, f"the README's row no longer says {pattern!r}: {text}"
    return float(found.group(1).replace(",", ""))


def near(measured: float, claimed: float, rel: float = 0.3) -> bool:
    return abs(measured - claimed) <= rel * claimed


def floats(rows: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in rows]


def grokking(said: str, run_dir: Path) -> None:
    memorized = number(r"memorizes .*? by step ~([\d,]+)", said)
    generalized = number(r"generalizes at ~([\d,]+)", said)
    found = read_summary(run_dir)["grokking"]
    assert found["grokked"], found
    assert near(found["memorization_step"], memorized), (found, memorized)
    assert near(found["generalization_step"], generalized), (found, generalized)
    assert found["delay_ratio"] == pytest.approx(found["generalization_step"]
                                                 / found["memorization_step"])


def phase_transition(said: str, run_dir: Path) -> None:
    jump = number(r"jumps to 100% at ~([\d,]+) steps", said)
    rows = read_metrics(run_dir)
    step = read_summary(run_dir)["transitions"]["test_acc_step"]
    assert step is not None and near(step, jump, rel=0.25), (step, jump)
    before = [r for r in rows if int(r["step"]) < 0.8 * step]
    assert max(floats(before, "test_acc")) < 0.6, "not at chance before the jump"
    assert floats(rows, "test_acc")[-1] == 1.0
    # "its weights move steadily through the plateau": the L1 distance grows at every evaluation
    distance = floats(before, "l1_dist_from_init")
    assert all(b > a for a, b in zip(distance, distance[1:])), distance


def rethinking(said: str, run_dir: Path) -> None:
    assert "random labels fit to 100%" in said and "test at chance" in said, said
    summary = read_summary(run_dir)
    assert (summary["status"], summary["stop_reason"]) == ("completed", "interpolation")
    assert summary["final"]["train_acc"] == 1.0
    assert summary["final"]["test_acc"] < 0.2  # 10 classes: chance is 0.1


def simplicity_bias(said: str, run_dir: Path) -> None:
    colour_only = number(r"worst-group accuracy ~0 for ~([\d,]+) steps", said)
    rows = read_metrics(run_dir)
    early = [r for r in rows if 0 < int(r["step"]) <= 0.7 * colour_only]
    assert early and max(floats(early, "test_worst_group_acc")) < 0.05
    late = [r for r in rows if int(r["step"]) >= 2 * colour_only]
    assert min(floats(late, "test_worst_group_acc")) > 0.1, "the shape is never learned"
    assert read_summary(run_dir)["groups"]["final_worst_group_acc"] > 0.5


def robustness(said: str, run_dir: Path) -> None:
    corruptions = number(r"under (\d+) CIFAR-10-C corruptions", said)
    severities = number(r"x (\d+) severities", said)
    rows = read_metrics(run_dir)
    named = [k for k in rows[0] if k.startswith("corruption_acc_")]
    assert len(named) == corruptions, named
    assert read_summary(run_dir)["config"]["probes"]["robustness"]["severities"] == \
        list(range(1, int(severities) + 1))
    assert "PGD" in said and read_summary(run_dir)["config"]["probes"]["robustness"]["attack"] \
        == "pgd"
    # "at every evaluation" or "at every Nth evaluation" (the first included)
    match = re.search(r"at every (?:(\d+)(?:st|nd|rd|th) )?evaluation", said)
    assert match, said
    every = int(match.group(1) or 1)
    assert read_summary(run_dir)["config"]["probes"]["robustness"]["every"] == every
    measured = [i for i, r in enumerate(rows)
                if all(r[k] != "" for k in ["adv_acc", "corruption_acc", *named])]
    assert measured == list(range(0, len(rows), every)), measured


CHECKS = {
    "dgrun phenomenon=grokking": grokking,
    "dgrun phenomenon=phase_transition": phase_transition,
    "dgrun phenomenon=rethinking corruption=random_labels": rethinking,
    "dgrun phenomenon=simplicity_bias": simplicity_bias,
    "dgrun phenomenon=robustness": robustness,
}


def test_every_row_of_the_table_has_a_check():
    assert [command for command, _ in phenomena_table()] == list(CHECKS)


@pytest.mark.parametrize("command,said", phenomena_table(),
                         ids=[command.split(" ", 1)[1] for command, _ in phenomena_table()])
def test_the_readme_command_shows_what_the_readme_says(tmp_path, command, said):
    train_here(tmp_path / "run", *command.split()[1:], *FAST)
    CHECKS[command](said, tmp_path / "run")
