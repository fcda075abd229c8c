"""`batch`: several commands in long-lived worker processes, each as it runs alone, with their times."""

from __future__ import annotations

import json

from benchmark.cli import main


def test_batch_runs_each_command_reports_times_and_the_worst_exit(tmp_path, capsys):
    out = tmp_path / "synth"
    runs = tmp_path / "results" / "runs" / "lora" / "eurosat"
    runs.mkdir(parents=True)
    (runs / "final-s42.json").write_text(json.dumps({"config": {"method": "lora"}, "wall_time_s": 2.5}))
    code = main(["batch", "--jobs", "2", "--results", str(tmp_path / "results"),
                 "--command", f"synth --out {out} --tasks eurosat --per-class 2",
                 "--command", "bench --method nope --tasks eurosat"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 2  # the unknown method's usage error, while the other command still ran
    assert (out / "eurosat").is_dir()
    lines = captured.out.splitlines()
    assert any(line.split()[1:3] == ["ok", "synth"] for line in lines if line.startswith("  "))
    assert any("exit 2  bench --method nope" in line for line in lines)
    assert "      2.5  lora (1 runs)" in lines
    assert lines[-1].startswith("batch: 2 command(s) in ") and lines[-1].endswith(" s wall with 2 job(s)")


def test_batch_refuses_to_nest(capsys):
    assert main(["batch", "--command", "batch --command methods"]) == 2
    assert "cannot run `batch` itself" in capsys.readouterr().err


def test_batch_lists_the_arguments_every_command_shares_once(tmp_path, capsys):
    out = tmp_path / "synth"
    code = main(["batch", "--jobs", "1",
                 "--command", f"synth --out {out} --tasks eurosat --per-class 2 --seed 0",
                 "--command", f"synth --out {out} --tasks svhn --per-class 2 --seed 0"])  # fmt: skip
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"every command: synth --out {out} --tasks … --per-class 2 --seed 0, where … is as listed" in lines
    assert [line.split()[1:] for line in lines if line.startswith("  ")] == [["ok", "eurosat"], ["ok", "svhn"]]
