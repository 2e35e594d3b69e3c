"""output.report_to: each tracker's real package, offline, read back with its own reader; a resumed run continues
its tracker run; a missing package is one line before the model loads."""

import json
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

import wandb_log
from helpers import REPO, milora
from milora_cli.recipe import validate
from milora_cli.training.train import train


def tiny_recipe(model_dir: str, data_path: str, out: Path, report_to: list[str]) -> dict:
    return {
        "model": {"name_or_path": model_dir},
        "adapter": {"init": "milora", "r": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "data": {"path": data_path, "val_size": 8, "max_length": 64},
        "train": {"max_steps": 4, "lr": 1e-2, "warmup_steps": 1, "log_every": 1, "eval_every": 2, "save_every": 2},
        "output": {"dir": str(out), "report_to": report_to, "project": "milora-test"},
    }


def train_and_resume(tiny_model_dir: str, tiny_data: str, run: Path, report_to: list[str]) -> list[dict]:
    """4 steps; then the same run resumed from its step-2 checkpoint, as after a crash at step 4 before the final
    save (steps 3 and 4 reach the tracker twice). Returns metrics.jsonl's training lines."""
    raw = tiny_recipe(tiny_model_dir, tiny_data, run, report_to)
    train(validate(raw), Console(quiet=True))
    for later in ("adapter", "best"):
        shutil.rmtree(run / later)
    (run / "summary.json").unlink()
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)  # a new process would start with a new Accelerator
    GradientState._reset_state()
    train(validate(raw), Console(quiet=True))
    assert (run / "adapter").is_dir()
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def test_tensorboard_events_read_back(tiny_model_dir, tiny_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "tb-run"
    metrics = train_and_resume(tiny_model_dir, tiny_data, run, ["tensorboard"])
    logdir = run / "tensorboard" / "milora-test"
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 2  # one file per session, in the same folder
    events = EventAccumulator(str(logdir))
    events.Reload()
    loss = events.Scalars("loss")
    # purge_step: the first session's steps 3 and 4 are hidden behind the resumed ones
    assert [event.step for event in loss] == [1, 2, 3, 4]
    # TensorBoard stores float32: the loss as logged, to within float32 rounding (relative 2^-24)
    assert [event.value for event in loss] == pytest.approx([m["loss"] for m in metrics], rel=1e-7)
    assert [event.step for event in events.Scalars("val_loss")] == [2, 4]
    hparams = list((run / "tensorboard" / "milora-test").glob("*/hparams.yml"))
    assert hparams and "adapter.r: 4" in hparams[0].read_text()


def test_mlflow_local_store_read_back(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")  # MLflow 3's default store, in a test folder
    run = tmp_path / "mlflow-run"
    metrics = train_and_resume(tiny_model_dir, tiny_data, run, ["mlflow"])
    run_id = json.loads((run / "trackers.json").read_text())["mlflow"]
    client = MlflowClient()
    [experiment] = [e for e in client.search_experiments() if e.name == "milora-test"]
    [found] = client.search_runs([experiment.experiment_id])
    assert found.info.run_id == run_id and found.info.run_name == "mlflow-run"  # one run, continued by the resume
    assert found.data.params["adapter.r"] == "4" and found.data.params["adapter.init"] == "milora"
    history = client.get_metric_history(run_id, "loss")
    # the resumed steps 3 and 4 are logged again after the first session's; the last value per step is the run's
    last = {entry.step: entry.value for entry in sorted(history, key=lambda entry: entry.timestamp)}
    assert last == pytest.approx({m["step"]: m["loss"] for m in metrics}, rel=1e-12)


def test_wandb_offline_run_read_back(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    from wandb.proto import wandb_internal_pb2

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")  # no Sentry report over the network
    run = tmp_path / "wandb-run"
    metrics = train_and_resume(tiny_model_dir, tiny_data, run, ["wandb"])
    run_id = json.loads((run / "trackers.json").read_text())["wandb"]
    sessions = sorted((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(sessions) == 2  # the resumed session logs to the same run id
    history, config, names = {}, {}, set()
    for session in sessions:
        for data in wandb_log.records(session / f"run-{run_id}.wandb"):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            if record.HasField("history"):
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                if "loss" in items:
                    history[items["_step"]] = items["loss"]
            elif record.HasField("config"):
                config |= {item.key: json.loads(item.value_json) for item in record.config.update}
            elif record.HasField("run"):
                names.add((record.run.run_id, record.run.display_name, record.run.project))
    assert names == {(run_id, "wandb-run", "milora-test")}
    assert config["adapter.r"] == 4 and config["model.name_or_path"] == tiny_model_dir
    assert history == pytest.approx({m["step"]: m["loss"] for m in metrics}, rel=1e-12)


def test_missing_tracker_package_is_one_line_before_the_model_loads(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(tiny_recipe(str(tmp_path / "no-model-here"), str(tmp_path / "no-data.json"), tmp_path / "run", ["wandb"])))
    # sys.modules[name] = None is how Python blocks an import: find_spec and import both see no wandb
    code = "import sys; sys.modules['wandb'] = None; from milora_cli.cli import main; sys.argv = ['milora', 'train', sys.argv[1]]; main()"
    result = subprocess.run([sys.executable, "-c", code, str(recipe)], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "WANDB_MODE": "offline"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: output.report_to names wandb, which is not installed: pip install wandb"]
    assert not (tmp_path / "run").exists()


# trackio reads TRACKIO_DIR once, when it is imported: its runs and their reading go through fresh processes
_TRACKIO_READ = """
import json, sys
from trackio.sqlite_storage import SQLiteStorage
project, run = sys.argv[1:]
print(json.dumps({"runs": SQLiteStorage.get_runs(project), "logs": SQLiteStorage.get_logs(project, run),
                  "config": SQLiteStorage.get_run_config(project, run)}, default=str))
"""


def test_trackio_local_run_read_back(tiny_model_dir, tiny_data, tmp_path):
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "OMP_NUM_THREADS": "1"}
    run = tmp_path / "trackio-run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(tiny_recipe(tiny_model_dir, tiny_data, run, ["trackio"])))
    first = milora("train", str(recipe), env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    for later in ("adapter", "best"):  # stopped after the step-2 checkpoint, as in train_and_resume
        shutil.rmtree(run / later)
    (run / "summary.json").unlink()
    resumed = milora("train", str(recipe), env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    read = subprocess.run([sys.executable, "-c", _TRACKIO_READ, "milora-test", "trackio-run"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert read.returncode == 0, read.stderr[-3000:]
    found = json.loads(read.stdout.strip().splitlines()[-1])
    assert found["runs"] == ["trackio-run"]  # one run, continued by the resume
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    last = {log["step"]: log["loss"] for log in found["logs"] if "loss" in log}
    assert last == pytest.approx({m["step"]: m["loss"] for m in metrics}, rel=1e-12)
    assert found["config"]["adapter.r"] == 4


def test_comet_offline_experiment_read_back(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    import zipfile

    monkeypatch.setenv("COMET_START_ONLINE", "false")  # comet_ml's OfflineExperiment: a zip per session, uploaded later
    monkeypatch.setenv("COMET_OFFLINE_DIRECTORY", str(tmp_path / "comet"))
    monkeypatch.setenv("COMET_ERROR_TRACKING_ENABLE", "false")  # else it reports to Sentry over the network
    monkeypatch.setenv("COMET_AUTO_LOG_ENV_HOST", "false")  # else it looks up Comet's server to find this machine's address
    run = tmp_path / "comet-run"
    metrics = train_and_resume(tiny_model_dir, tiny_data, run, ["comet"])
    key = json.loads((run / "trackers.json").read_text())["comet"]
    archives = sorted((tmp_path / "comet").glob("*.zip"), key=lambda path: path.stat().st_mtime)
    assert len(archives) == 2
    loss, params, names = {}, {}, set()
    for archive in archives:  # in session order: the resumed session's steps 3 and 4 come last
        with zipfile.ZipFile(archive) as folder:
            assert json.loads(folder.read("experiment.json"))["offline_id"] == key  # both upload into one experiment
            for line in folder.read("messages.json").decode().splitlines():
                message = json.loads(line)
                payload = message["payload"]
                if message["type"] == "metric_msg" and payload["metric"]["metricName"] == "loss":
                    loss[payload["metric"]["step"]] = payload["metric"]["metricValue"]
                elif message["type"] == "parameter_msg":
                    params[payload["param"]["paramName"]] = payload["param"]["paramValue"]
                elif message["type"] == "log_other" and payload["key"] == "Name":
                    names.add(payload["value"])
    assert names == {"comet-run"} and params["adapter.r"] == 4
    assert loss == pytest.approx({m["step"]: m["loss"] for m in metrics}, rel=1e-12)


@pytest.mark.parametrize("value, expected", [("none", []), (["none"], []), ("wandb", ["wandb"]),
                                             (["tensorboard", "mlflow"], ["tensorboard", "mlflow"])])
def test_report_to_takes_a_name_or_a_list(value, expected):
    assert validate({"data": {"builtin": "quickstart"}, "output": {"report_to": value}}).output.report_to == expected


@pytest.mark.parametrize("output, needle", [
    ({"report_to": ["none", "wandb"]}, "none cannot be combined with a tracker"),
    ({"report_to": ["neptune"]}, "Input should be 'tensorboard', 'wandb', 'mlflow', 'trackio', 'comet' or 'none'"),
    ({"tensorboard": True}, "did you mean 'output.report_to'?"),  # the key report_to replaced
])
def test_bad_report_to_is_one_line(output, needle):
    from milora_cli.errors import RecipeError

    with pytest.raises(RecipeError, match=re.escape(needle)):
        validate({"data": {"builtin": "quickstart"}, "output": output})
