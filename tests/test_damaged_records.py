"""Every reader of a run directory (`show`, `report`, `analyze`) on damaged files: what a kill
leaves (a half-written last metrics row) is dropped with a note; anything else damaged is one
line naming the file and the fix, exit 2, never a traceback."""
from __future__ import annotations

import shutil

import pytest

from conftest import FAST, cli_here, read_metrics, train_here

READERS = {"show": [], "report": ["--no-figures"], "analyze": ["dynamics"]}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("damaged") / "run"
    train_here(run_dir, "trainer.max_epochs=3", *FAST)
    return run_dir


def reader(capsys, command: str, run, tmp_path):
    extra = list(READERS[command])
    if command == "report":
        extra += ["--out", str(tmp_path / "report")]
    return cli_here(capsys, command, str(run), *extra)


@pytest.fixture
def copy(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    return run


@pytest.mark.parametrize("command", READERS)
def test_a_half_written_last_metrics_row_is_dropped_with_a_note(command, copy, tmp_path, capsys):
    path = copy / "metrics.csv"
    rows = read_metrics(copy)
    text = path.read_text()
    last = text.rstrip("\r\n").rfind("\n") + 1
    path.write_text(text[:last] + text[last:last + 12])  # killed while appending the last row
    code, out, err = reader(capsys, command, copy, tmp_path)
    assert code == 0, err
    assert "dropped a half-written last row" in err and str(path) in err
    if command == "analyze":
        curves = (copy / "analysis" / "dynamics" / "curves.csv").read_text().splitlines()
        assert len(curves) == len(rows)  # the header and every complete row
    if command == "show":
        assert f"of {len(rows) - 1} metrics rows" in out


@pytest.mark.parametrize("damage,expected", [
    (("summary.json", "[]\n"), "summary.json is damaged: a JSON list, not an object"),
    (("summary.json", '{"status": "compl'), "summary.json is damaged: not JSON"),
    ((".hydra/config.yaml", "- a\n- b\n"), "config.yaml is damaged: the config must be a mapping"),
])
@pytest.mark.parametrize("command", ["show", "report"])
def test_a_damaged_record_file_is_one_line_naming_it(command, damage, expected, copy, tmp_path,
                                                     capsys):
    name, text = damage
    if name.startswith(".hydra"):
        (copy / "summary.json").unlink()  # the config is read from .hydra/ only without it
        (copy / ".hydra").mkdir(exist_ok=True)
    (copy / name).write_text(text)
    code, _, err = reader(capsys, command, copy, tmp_path)
    assert code == 2
    assert err.startswith("dgrun: error: ") and len(err.strip().splitlines()) == 1, err
    assert expected in err and str(copy / name) in err and "move it aside" in err


@pytest.mark.parametrize("text,expected", [("[]\n", "a JSON list"), ("{", "not JSON"),
                                           ('{"config": [1]}', "'config' is not a mapping")])
def test_analyze_refuses_a_damaged_summary_in_one_line(text, expected, copy, tmp_path, capsys):
    (copy / "summary.json").write_text(text)
    code, _, err = reader(capsys, "analyze", copy, tmp_path)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert expected in err and str(copy / "summary.json") in err
