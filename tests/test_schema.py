"""One schema for result and decision files (`benchmark.run.schema`): what a run writes validates and reads back
byte for byte; a file that breaks the schema is refused at read, by every reader, in one line naming the file
and the field; a record that breaks it is never written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmark.cli import main
from benchmark.run import runner
from benchmark.run.results import json_text, read_result, write_result
from benchmark.run.schema import MODES, PROTOCOLS
from benchmark.sweep.decisions import read_json_decision, record_digest, write_json_decision
from tests.conftest import argv

LRS = "1e-9,0.05"


@pytest.fixture(scope="module")
def swept(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A grid sweep of the linear probe on svhn, as the runner writes it: grid points, the selection, one seed."""
    results = tmp_path_factory.mktemp("swept") / "r"
    assert main(argv(f"bench --method linear --tasks svhn --data-root {synth_root} --results {results}",
                     "--protocol", "grid", "--lr-grid", LRS, "--wd-grid", "0", "--epochs", "1",
                     "--seeds", "42")) == 0  # fmt: skip
    return results


def copy_with(swept: Path, tmp_path: Path, edit) -> tuple[Path, Path]:
    """A results directory holding the sweep's final run with `edit` applied to its record."""
    results = tmp_path / "r"
    path = results / "runs/linear/svhn/grid-s42.json"
    path.parent.mkdir(parents=True)
    record = json.loads((swept / "runs/linear/svhn/grid-s42.json").read_text())
    edit(record)
    path.write_text(json.dumps(record))
    return results, path


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_the_suite_and_the_schema_know_the_same_protocols_and_modes():
    from tasks import SUITES

    assert PROTOCOLS == runner.PROTOCOLS and all(set(MODES) == set(s.modes) for s in SUITES.values())


def test_what_a_run_writes_validates_and_reads_back_byte_for_byte(swept):
    paths = sorted((swept / "runs/linear/svhn").rglob("*.json"))
    results = [p for p in paths if "decisions" not in p.parts]
    assert len(results) == 3
    for path in results:
        record = read_result(path)
        assert json_text(record).encode() == path.read_bytes()  # nothing reordered, added or dropped
    decision = read_json_decision(swept / "runs/linear/svhn/decisions/grid-selection.json")
    tune = [read_result(p) for p in sorted((swept / "runs/linear/svhn/grid-tune").glob("*.json"))]
    # What the decision hashed is what reads give back today.
    assert set(decision["inputs"].values()) == {record_digest(r) for r in tune}


BAD = {
    "an unknown protocol": (lambda r: r.update(protocol="sweep"), r"its `protocol` is 'sweep'"),
    "a number where a date belongs": (lambda r: r.update(started_at=1764772671), r"its `started_at` is 1764772671"),
    "a date without its time zone": (lambda r: r.update(finished_at="2026-12-03T14:00:00"), r"its `finished_at`"),
    "no data": (lambda r: r.update(data=None), r"its `data` is null"),
    "no backbone": (lambda r: r["config"].update(backbone=None), r"its `config.backbone` is null"),
    "a split without its hash": (lambda r: r["data"]["eval_split"].pop("sha256"), r"has no `data.eval_split.sha256`"),
    "an unknown field": (lambda r: r.update(backbone="vit"), r"an unknown field `backbone`"),
    "a bool for a count": (lambda r: r["params"].update(head=True), r"its `params.head` is true"),
    "an error under status ok": (lambda r: r.update(error="boom"), r"its `error` is 'boom'"),
    "no params under status ok": (lambda r: r.update(params=None), r"its `params` is null under status ok"),
    "a text seed": (lambda r: r.update(seed="42"), r"its `seed` is '42'"),
    "a selection hash that is none": (lambda r: r["selection"].update(sha256="x"), r"its `selection.sha256`"),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("command", ["leaderboard", "compare"])
def test_every_reader_refuses_a_result_that_breaks_the_schema(case, command, swept, tmp_path, capsys):
    edit, field = BAD[case]
    results, path = copy_with(swept, tmp_path, edit)
    capsys.readouterr()
    assert main([command, "--results", str(results)]) == 2
    err = one_line(capsys)
    assert re.search(re.escape(f"{path} is not a valid result file: ") + ".*" + field, err), err
    assert sorted(p.name for p in results.rglob("*") if p.is_file()) == ["grid-s42.json"]  # nothing written


@pytest.mark.parametrize("case", ["no data", "a number where a date belongs", "an unknown protocol"])
def test_resuming_refuses_a_result_that_breaks_the_schema(case, swept, synth_root, tmp_path, capsys):
    edit, field = BAD[case]
    results, path = copy_with(swept, tmp_path, edit)
    before = path.read_bytes()
    capsys.readouterr()
    assert main(argv(f"bench --method linear --tasks svhn --data-root {synth_root} --results {results}",
                     "--protocol", "grid", "--lr-grid", LRS, "--wd-grid", "0", "--epochs", "1",
                     "--seeds", "42")) == 2  # fmt: skip
    assert re.search(re.escape(str(path)) + ".*" + field, one_line(capsys))
    assert path.read_bytes() == before


def failed(record: dict) -> None:
    """The record a run that crashed while building leaves: no counts, no accuracy, no speed."""
    for key in ("train_images_per_s", "diagnostics", "tunable_state"):
        record.pop(key, None)
    record.update(status="failed", error="RuntimeError: boom", traceback="Traceback ...", test_acc=None,
                  params=None, train_loss=[float("nan")])  # fmt: skip


def test_a_failed_run_carries_fewer_fields_and_round_trips_with_its_nan_losses(swept, tmp_path):
    results, path = copy_with(swept, tmp_path, failed)
    record = read_result(path)
    assert record["status"] == "failed" and record["params"] is None
    write_result(path, record)
    assert read_result(path)["error"] == "RuntimeError: boom"
    assert "NaN" in path.read_text()
    assert main(["leaderboard", "--results", str(results)]) == 0


def test_a_record_that_breaks_the_schema_is_never_written(swept, tmp_path):
    record = json.loads((swept / "runs/linear/svhn/grid-s42.json").read_text())
    target = tmp_path / "runs/linear/svhn/grid-s42.json"
    for edit in (lambda r: r.update(protocol="sweep"), lambda r: r.update(test_acc=float("nan")),
                 lambda r: r.update(method="full")):  # fmt: skip
        bad = json.loads(json.dumps(record))
        edit(bad)
        with pytest.raises(ValueError, match=rf"refusing to write an invalid result to {re.escape(str(target))}"):
            write_result(target, bad)
        assert not target.parent.exists() or not any(target.parent.iterdir())


def test_a_decision_that_breaks_its_schema_is_never_written(tmp_path):
    path = tmp_path / "grid-selection.json"
    about = {"lr": 0.1, "weight_decay": 0.0, "val_acc": 50.0, "tuning_seed": 42, "grid": [[0.1, 0.0, 50.0]]}
    with pytest.raises(ValueError, match="refusing to write an invalid decision"):
        write_json_decision(path, {"lr": "0.1", "weight_decay": 0.0, "tuning_seed": 42}, {}, about)
    assert not path.exists()
    stored = write_json_decision(path, {"lr": 0.1, "weight_decay": 0.0, "tuning_seed": 42}, {"a.json": None}, about)
    assert read_json_decision(path) == stored
