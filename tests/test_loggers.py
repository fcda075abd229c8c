"""`--logger`: each run's per-epoch metrics through Lightning's logger in `<result stem>.logs/` beside its result,
recorded with the result but no part of its identity; a missing package or an unknown logger refused in one line."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd
import pytest

from benchmark.cli import main
from tests.conftest import argv

RESULT = Path("runs/linear/camelyon/final-s42.json")


def run(root: Path, results: Path, *extra: str, epochs: int = 2) -> int:
    return main(argv(f"run --method linear --task camelyon --data-root {root} --results {results}",
                     "--epochs", str(epochs), "--batch-size", "16", *extra))  # fmt: skip


def logs(results: Path) -> Path:
    return results / RESULT.with_name("final-s42.logs")


def test_the_default_csv_logger_writes_one_row_of_train_loss_per_epoch(synth_root, tmp_path):
    results = tmp_path / "r"
    assert run(synth_root, results, epochs=3) == 0
    record = json.loads((results / RESULT).read_text())
    assert record["config"]["logger"] == "csv" and record["status"] == "ok"
    metrics = pd.read_csv(logs(results) / "metrics.csv")
    epochs = metrics.dropna(subset=["train/loss"])
    assert list(epochs["epoch"]) == [0, 1, 2]
    assert list(epochs["train/loss"]) == pytest.approx(record["train_loss"])  # the same numbers as the result
    assert metrics["train/loss_step"].notna().sum() >= 3  # at least one step value per epoch
    assert any(c == "lr" or c.startswith("lr/") for c in metrics.columns)
    final = metrics.dropna(subset=["test/acc"])
    assert list(final["test/acc"]) == pytest.approx([record["test_acc"]]) and final["test/loss"].notna().all()
    assert "logger: csv" in (logs(results) / "hparams.yaml").read_text()
    # A run executed again replaces its logs (no second version beside the first).
    assert run(synth_root, results, epochs=1) == 0
    assert sorted(p.name for p in logs(results).iterdir()) == ["hparams.yaml", "metrics.csv"]
    assert pd.read_csv(logs(results) / "metrics.csv")["train/loss"].notna().sum() == 1


def test_tensorboard_writes_event_files(synth_root, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    results = tmp_path / "r"
    assert run(synth_root, results, "--logger", "tensorboard") == 0
    assert json.loads((results / RESULT).read_text())["config"]["logger"] == "tensorboard"
    events = list(logs(results).glob("events.out.tfevents.*"))
    assert events
    losses = []
    for path in events:
        accumulator = EventAccumulator(str(path)).Reload()
        if "train/loss" in accumulator.Tags()["scalars"]:
            losses += accumulator.Scalars("train/loss")
    assert len(losses) == 2


def test_no_logger_writes_no_log_folder_and_removes_a_stale_one(synth_root, tmp_path):
    results = tmp_path / "r"
    logs(results).mkdir(parents=True)
    (logs(results) / "metrics.csv").write_text("epoch,train/loss\n0,1.0\n")  # an earlier attempt's
    assert run(synth_root, results, "--logger", "none") == 0
    assert json.loads((results / RESULT).read_text())["config"]["logger"] == "none"
    assert not logs(results).exists()
    assert [p.name for p in (results / RESULT).parent.iterdir()] == ["final-s42.json"]


def test_an_unknown_logger_is_refused_in_one_line(synth_root, tmp_path, capsys):
    assert run(synth_root, tmp_path / "r", "--logger", "mlflow") == 2
    err = capsys.readouterr().err.strip()
    assert "invalid choice: 'mlflow'" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_a_missing_logger_package_is_refused_before_training_with_the_install_hint(
    synth_root, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "wandb", None)  # absent, whether installed or not
    for command in ("run", "bench", "reproduce"):
        args = [command, "--method", "linear", "--task" if command == "run" else "--tasks", "camelyon", "--results",
                str(tmp_path / "r"), "--logger", "wandb"]  # fmt: skip
        assert main(args if command == "reproduce" else [*args, "--data-root", str(synth_root)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "wandb" in err and "pip install 'peft-bench[wandb]'" in err, err
    assert not (tmp_path / "r").exists()


def test_a_sweep_resumed_with_another_logger_reuses_its_finished_runs(synth_root, tmp_path, capsys):
    results = tmp_path / "r"
    bench = argv(f"bench --method linear --tasks camelyon --data-root {synth_root} --results {results}",
                 "--epochs", "1", "--batch-size", "16", "--seeds", "42")  # fmt: skip
    assert main(bench) == 0
    capsys.readouterr()
    before = (results / RESULT).read_bytes()
    assert (logs(results) / "metrics.csv").is_file()
    assert main([*bench, "--logger", "none"]) == 0
    assert re.search(r"^0 run\(s\) executed", capsys.readouterr().out, re.M)
    assert (results / RESULT).read_bytes() == before and (logs(results) / "metrics.csv").is_file()


def test_the_logger_is_recorded_but_no_part_of_a_runs_identity():
    from benchmark.core.errors import UserError
    from benchmark.run.runner import NOT_IDENTITY, SPEED_ONLY, Settings
    from benchmark.sweep.resume import identity

    base = Settings(backbone="test_vit")
    other = replace(base, logger="none")
    assert set(NOT_IDENTITY) == {*SPEED_ONLY, "logger"}
    assert identity(asdict(other), deferred=False, grid=False) == identity(asdict(base), deferred=False, grid=False)
    with pytest.raises(UserError, match="unknown logger 'mlflow'"):
        replace(base, logger="mlflow")


def test_runs_under_different_loggers_share_a_leaderboard_row():
    from benchmark.report.variants import descriptor

    record = {"method": "linear", "task": "svhn", "protocol": "final",
              "config": {"backbone": "test_vit", "logger": "csv", "method_config": {}}}  # fmt: skip
    assert descriptor(record) == descriptor({**record, "config": {**record["config"], "logger": "none"}})
