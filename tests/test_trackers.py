"""Experiment trackers: what each backend writes is read back with that backend's own reader
(TensorBoard's EventAccumulator, MLflow's client, W&B's offline transaction log) and compared
with the rows sent; resume continues the same tracker runs without duplicated steps; a failing
tracker is dropped with one warning; a missing package is one line naming the extra."""
from __future__ import annotations

import glob
import json
import logging
import math
import shutil
import struct
import sys
from pathlib import Path

import pytest

from dgrun.errors import UserError
from dgrun.trackers import STATE_FILE, TRACKERS, build, flatten
from dgrun.trackers.base import scalars

ROOT = Path(__file__).resolve().parents[1]

CONFIG = {"seed": 3, "model": {"name": "mlp1", "width": 512, "dropout": 0.0},
          "optimizer": {"name": "sgd", "lr": 0.01, "nesterov": False},
          "dataset": {"name": "digits", "augment": None}, "trainer": {"max_epochs": 5},
          "probes": {}, "milestones": [10, 20]}


def make_rows(steps, shift: float = 0.0) -> list[dict]:
    """Known rows: a None (not measured) at step 10, a NaN at step 20, a shift to tell the
    rows of a resumed segment from those of the interrupted one."""
    return [{"step": s, "epoch": s / 10, "time_s": 0.25 * s, "lr": 0.01,
             "train_loss": 2.0 / (s + 1) + shift, "train_acc": s / 100,
             "test_loss": None if s == 10 else 3.0 / (s + 2) + shift, "test_acc": s / 200,
             "weight_norm": math.nan if s == 20 else 5.0 + s + shift} for s in steps]


ROWS = make_rows(range(0, 60, 10))
SUMMARY = {"status": "completed", "stop_reason": "max_steps", "steps": 50, "time_s": 12.5,
           "final": {"train_acc": 0.5, "test_acc": 0.25},
           "interpolation": {"reached": False, "step": None}, "resumed_at_steps": []}


def png(path: Path, colour=(200, 30, 30)) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 8), colour).save(path)
    return path


@pytest.fixture(scope="module")
def isolated_wandb(tmp_path_factory):
    """W&B's own settings and caches in a temporary home; its service stopped at the end."""
    home = tmp_path_factory.mktemp("wandb_home")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
            mp.setenv(var, str(home / var.lower()))
        for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_RUN_ID",
                    "MLFLOW_TRACKING_URI"):
            mp.delenv(var, raising=False)
        yield
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, isolated_wandb):
    """One run through all three trackers: start, six rows, two plots, finish."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    run_dir = tmp_path_factory.mktemp("full") / "run"
    run_dir.mkdir()
    plots = [png(run_dir / "plots" / "loss.png"), png(run_dir / "plots" / "accuracy.png")]
    trackers = build({"tensorboard": {}, "mlflow": {}, "wandb": {"tags": ["t1"]}})
    trackers.start(run_dir, CONFIG, resume=False)
    for row in ROWS:
        trackers.log_metrics(row)
    trackers.log_images(plots, step=50)
    trackers.finish(SUMMARY)
    assert trackers.failed == {}
    return run_dir


# ---- readers: each backend's own --------------------------------------------------------

def tb_scalars(log_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], object]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0,
                                                        "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"]}, acc


def mlflow_client(run_dir: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())


def wandb_records(path: Path) -> list:
    """The records of an offline .wandb file: a LevelDB-style log (7-byte header
    ':W&B' + magic + version, then 32 KiB blocks of [crc32, length, type] + data) of
    wandb_internal_pb2.Record messages."""
    try:
        from wandb.proto import wandb_internal_pb2 as pb
    except ImportError:
        pytest.skip("this wandb has no readable record protos")
    data = path.read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B"
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:          # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):                   # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def wandb_history(run_dir: Path, run_id: str) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(str(run_dir / "wandb" / f"offline-run-*-{run_id}*" /
                                     f"run-{run_id}.wandb"))):
        for record in wandb_records(Path(path)):
            if record.WhichOneof("record_type") == "history":
                rows.append({".".join(item.nested_key) or item.key: json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def close(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6)


# ---- the three backends read back ---------------------------------------------------------

def test_tensorboard_event_files_hold_the_rows(full_run):
    series, acc = tb_scalars(full_run / "tensorboard")
    expected = {key for row in ROWS for key in scalars(row)}
    assert set(series) == expected
    for key in expected:
        sent = [(r["step"], float(r[key])) for r in ROWS if r[key] is not None]
        got = series[key]
        assert [s for s, _ in got] == [s for s, _ in sent], key
        assert all(close(g, v) for (_, g), (_, v) in zip(got, sent)), key
    assert 10 not in [s for s, _ in series["test_loss"]]          # None: not measured
    assert math.isnan(dict(series["weight_norm"])[20])             # NaN: shown as NaN

    images = acc.Tags()["images"]
    assert sorted(images) == ["plots/accuracy", "plots/loss"]
    assert [e.step for e in acc.Images("plots/loss")] == [50]
    assert (acc.Images("plots/loss")[0].width, acc.Images("plots/loss")[0].height) == (12, 8)

    from tensorboard.plugins.hparams import api_pb2, metadata

    content = acc.PluginTagToContent("hparams")
    start = metadata.parse_session_start_info_plugin_data(
        content[metadata.SESSION_START_INFO_TAG])
    hparams = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
               for k, v in start.hparams.items()}
    assert hparams["optimizer.lr"] == 0.01 and hparams["model.width"] == 512
    assert hparams["optimizer.nesterov"] is False and hparams["dataset.augment"] == "null"
    assert hparams["milestones"] == "[10, 20]" and hparams["probes"] == "{}"
    end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
    assert end.status == api_pb2.STATUS_SUCCESS
    summary_text = acc.Tensors("summary/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(summary_text.strip("`\n")) == SUMMARY


def test_mlflow_file_store_holds_params_metrics_and_status(full_run):
    client = mlflow_client(full_run)
    run_id = json.loads((full_run / STATE_FILE).read_text())["mlflow"]["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "/".join(full_run.parts[-2:])
    assert run.data.params == {k: str(v) for k, v in flatten(CONFIG).items()}
    assert run.data.params["optimizer.lr"] == "0.01"
    for key in ("train_loss", "test_loss", "test_acc", "weight_norm", "epoch", "lr"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        sent = [(r["step"], float(r[key])) for r in ROWS if r[key] is not None]
        assert [s for s, _ in history] == [s for s, _ in sent], key
        assert all(close(g, v) for (_, g), (_, v) in zip(history, sent)), key
    assert "step" not in run.data.metrics
    assert run.data.metrics["summary.steps"] == 50 and run.data.metrics["summary.time_s"] == 12.5
    assert run.data.tags["dgrun.status"] == "completed"
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {
        a.path for a in client.list_artifacts(run_id, "plots")}
    assert {"summary.json", "plots/loss.png", "plots/accuracy.png"} <= artifacts


def test_wandb_offline_run_directory_holds_the_rows(full_run):
    state = json.loads((full_run / STATE_FILE).read_text())["wandb"]
    run_id = state["run_id"]
    run_dirs = glob.glob(str(full_run / "wandb" / f"offline-run-*-{run_id}"))
    assert len(run_dirs) == 1 and (Path(run_dirs[0]) / f"run-{run_id}.wandb").is_file()
    history = wandb_history(full_run, run_id)
    metric_rows = [h for h in history if "train_loss" in h]
    assert [h["_step"] for h in metric_rows] == [r["step"] for r in ROWS]
    for got, sent in zip(metric_rows, ROWS):
        for key, value in scalars(sent).items():
            assert close(float(got[key]), value), key
        assert "test_loss" not in got or sent["test_loss"] is not None   # None left out
    image = [h for h in history if "plots/loss.path" in h]       # merged into step 50's row
    assert [h["_step"] for h in image] == [50]
    assert (Path(run_dirs[0]) / "files" / image[0]["plots/loss.path"]).is_file()
    records = wandb_records(Path(run_dirs[0]) / f"run-{run_id}.wandb")
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["optimizer.lr"] == 0.01 and config["milestones"] == [10, 20]
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({u.key or ".".join(u.nested_key): json.loads(u.value_json)
                            for u in r.summary.update})
    assert summary["status"] == "completed" and summary["final"] == SUMMARY["final"]
    assert run.telemetry.feature.offline


# ---- resume -------------------------------------------------------------------------------

def test_resume_continues_the_same_runs_without_duplicate_steps(tmp_path, isolated_wandb):
    """Segment 1 logs steps 0..50 and dies; the checkpoint was at step 30, so segment 2
    re-measures 30..50 (shifted values here) and goes on to 80."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first, second = make_rows(range(0, 60, 10)), make_rows(range(30, 90, 10), shift=1.0)
    specs = {"tensorboard": {}, "mlflow": {}, "wandb": {}}

    trackers = build(specs)
    trackers.start(run_dir, CONFIG, resume=False)
    for row in first:
        trackers.log_metrics(row)
    before = json.loads((run_dir / STATE_FILE).read_text())
    trackers.close()            # the process dies: no finish

    trackers = build(specs)
    trackers.start(run_dir, {**CONFIG, "trainer": {"max_epochs": 9}}, resume=True)
    for row in second:
        trackers.log_metrics(row)
    trackers.finish({**SUMMARY, "steps": 80})
    after = json.loads((run_dir / STATE_FILE).read_text())
    assert trackers.failed == {}
    assert after["mlflow"]["run_id"] == before["mlflow"]["run_id"]
    assert after["wandb"]["run_id"] == before["wandb"]["run_id"]
    assert after["mlflow"]["last_step"] == after["wandb"]["last_step"] == 80

    # TensorBoard: every step once; from the resume point on, the re-measured values.
    series, _ = tb_scalars(run_dir / "tensorboard")
    truth = {r["step"]: r["train_loss"] for r in first if r["step"] < 30}
    truth.update({r["step"]: r["train_loss"] for r in second})
    assert [s for s, _ in series["train_loss"]] == sorted(truth)
    assert all(close(v, truth[s]) for s, v in series["train_loss"])

    # MLflow: one run in the store, each step once, finished.
    client = mlflow_client(run_dir)
    runs = client.search_runs([after["mlflow"]["experiment_id"]])
    assert [r.info.run_id for r in runs] == [before["mlflow"]["run_id"]]
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train_loss")]
    assert sorted(steps) == list(range(0, 90, 10))
    assert runs[0].info.status == "FINISHED"

    # W&B: two offline segments of one run id; together, each step once.
    run_id = after["wandb"]["run_id"]
    assert len(glob.glob(str(run_dir / "wandb" / f"offline-run-*-{run_id}*"))) == 2
    steps = [h["_step"] for h in wandb_history(run_dir, run_id) if "train_loss" in h]
    assert sorted(steps) == list(range(0, 90, 10))


def test_fresh_start_in_a_used_directory_starts_new_runs(tmp_path):
    """trainer.resume=false over an old run: new tracker runs, and TensorBoard hides the old
    curve instead of drawing both."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_ids = []
    for shift in (0.0, 5.0):
        trackers = build({"tensorboard": {}, "mlflow": {}})
        trackers.start(run_dir, CONFIG, resume=False)
        for row in make_rows(range(0, 40, 10), shift=shift):
            trackers.log_metrics(row)
        trackers.finish(SUMMARY)
        run_ids.append(json.loads((run_dir / STATE_FILE).read_text())["mlflow"]["run_id"])
    assert run_ids[0] != run_ids[1]
    series, _ = tb_scalars(run_dir / "tensorboard")
    assert [s for s, _ in series["train_loss"]] == [0, 10, 20, 30]
    assert all(v > 5.0 for _, v in series["train_loss"])


# ---- failures -----------------------------------------------------------------------------

@pytest.mark.parametrize("when", ["start", "log_metrics"])
def test_a_failing_tracker_warns_once_and_the_others_keep_logging(tmp_path, caplog, when):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    options = {}
    if when == "start":       # a store that cannot exist: a "directory" inside a file
        (tmp_path / "a_file").write_text("")
        options = {"tracking_uri": (tmp_path / "a_file" / "mlruns").as_uri()}
    trackers = build({"mlflow": options, "tensorboard": {}})
    calls = []

    def disk_full(*args, **kwargs):
        calls.append(1)
        raise OSError(28, "No space left on device")

    with caplog.at_level(logging.WARNING, logger="dgrun"):
        trackers.start(run_dir, CONFIG, resume=False)
        if when == "log_metrics":
            trackers.trackers["mlflow"].client.log_batch = disk_full
        for row in ROWS:
            trackers.log_metrics(row)
        trackers.log_images([png(run_dir / "plots" / "loss.png")], step=50)
        trackers.finish(SUMMARY)

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "tracker 'mlflow' failed in " + when in warnings[0].getMessage()
    assert set(trackers.failed) == {"mlflow"}
    assert len(calls) == (1 if when == "log_metrics" else 0)      # dropped after the failure
    series, _ = tb_scalars(run_dir / "tensorboard")
    assert [s for s, _ in series["train_loss"]] == [r["step"] for r in ROWS]


def test_a_tracker_failing_inside_its_library_does_not_stop_the_others(tmp_path, caplog):
    """An exception from deep inside a backend (here TensorBoard's writer) at finish."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    trackers = build({"tensorboard": {}, "mlflow": {}})
    trackers.start(run_dir, CONFIG, resume=False)
    trackers.log_metrics(ROWS[0])
    tb = trackers.trackers["tensorboard"]

    def broken(*args, **kwargs):
        raise RuntimeError("writer thread died")

    tb.writer.add_text = broken
    with caplog.at_level(logging.WARNING, logger="dgrun"):
        trackers.finish(SUMMARY)
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        "tracker 'tensorboard' failed in finish"]
    run_id = json.loads((run_dir / STATE_FILE).read_text())["mlflow"]["run_id"]
    assert mlflow_client(run_dir).get_run(run_id).info.status == "FINISHED"


@pytest.mark.parametrize("name", ["tensorboard", "wandb", "mlflow"])
def test_a_missing_package_is_one_line_naming_the_extra(monkeypatch, name):
    cls = TRACKERS.get(name)
    monkeypatch.setitem(sys.modules, cls.requires, None)   # `import <package>` fails
    with pytest.raises(UserError) as err:
        build({name: {}})
    message = str(err.value)
    assert "\n" not in message
    assert f"pip install 'dgrun[{name}]'" in message and "not installed" in message


def test_unknown_trackers_options_and_modes_are_user_errors():
    with pytest.raises(UserError, match="unknown logger 'neptune'.*mlflow, tensorboard, wandb"):
        build({"neptune": {}})
    with pytest.raises(UserError, match="logger 'mlflow' has no option 'uri'"):
        build({"mlflow": {"uri": "x"}})
    pytest.importorskip("wandb")
    with pytest.raises(UserError, match="logger.wandb.mode='onlin'"):
        build({"wandb": {"mode": "onlin"}})


def test_no_tracker_is_a_silent_no_op(tmp_path):
    trackers = build(None)
    assert not trackers and build({}).names == []
    trackers.start(tmp_path, CONFIG, resume=False)
    trackers.log_metrics(ROWS[0])
    trackers.finish(SUMMARY)
    assert list(tmp_path.iterdir()) == []


# ---- the config group ---------------------------------------------------------------------

def test_the_logger_group_composes_one_or_several_trackers(tmp_path):
    """logger=NAME and logger=[A,B] over a root config whose default is logger: none."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    shutil.copytree(ROOT / "conf" / "logger", tmp_path / "logger")
    (tmp_path / "config.yaml").write_text("defaults:\n  - _self_\n  - logger: none\n")

    def logger(*overrides):
        with initialize_config_dir(config_dir=str(tmp_path), version_base=None):
            cfg = compose("config", overrides=list(overrides))
        return OmegaConf.to_container(cfg.logger, resolve=True)

    assert logger() == {}
    assert list(logger("logger=tensorboard")) == ["tensorboard"]
    both = logger("logger=[tensorboard,mlflow]", "logger.mlflow.experiment=zhang")
    assert list(both) == ["tensorboard", "mlflow"]
    assert both["mlflow"] == {"tracking_uri": None, "experiment": "zhang", "run_name": None,
                              "tags": {}}
    assert logger("logger=wandb")["wandb"]["mode"] == "offline"
    # Every option a YAML sets is an option its tracker takes.
    for name in TRACKERS.names():
        options = logger(f"logger={name}")[name]
        assert set(options) <= set(TRACKERS.options(name)), name


def test_resume_without_the_old_mlflow_run_starts_a_new_one(tmp_path, caplog):
    """The old run was deleted from the store between the segments: a warning, a new run,
    the new rows in it."""
    pytest.importorskip("mlflow")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    trackers = build({"mlflow": {}})
    trackers.start(run_dir, CONFIG, resume=False)
    for row in make_rows(range(0, 40, 10)):
        trackers.log_metrics(row)
    state = json.loads((run_dir / STATE_FILE).read_text())["mlflow"]
    old = state["run_id"]
    shutil.rmtree(run_dir / "mlruns" / state["experiment_id"] / old)

    trackers = build({"mlflow": {}})
    with caplog.at_level(logging.WARNING, logger="dgrun"):
        trackers.start(run_dir, CONFIG, resume=True)
    for row in make_rows(range(20, 60, 10)):
        trackers.log_metrics(row)
    trackers.finish(SUMMARY)
    assert trackers.failed == {} and "cannot be continued" in caplog.text
    new = json.loads((run_dir / STATE_FILE).read_text())["mlflow"]["run_id"]
    assert new != old
    steps = [m.step for m in mlflow_client(run_dir).get_metric_history(new, "train_loss")]
    assert sorted(steps) == [20, 30, 40, 50]
