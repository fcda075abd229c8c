"""The Python API (`benchmark.api`) and the `peft-bench` console script: the README's example runs as written, each
function gives what its command gives, and bad input is the command's `UserError`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import torch

import benchmark.api as pb
from benchmark import cli
from benchmark.core.errors import UserError
from benchmark.report.leaderboard import runs_frame
from methods import PeftModel, list_methods
from tasks import get_task
from tests.conftest import argv

ROOT = Path(__file__).resolve().parents[1]
TINY = {"backbone": "test_vit", "pretrained": False, "image_size": 32, "quiet": True}


def readme_example() -> str:
    """The one fenced Python block between the README's api-example markers."""
    text = (ROOT / "README.md").read_text()
    section = re.search(r"<!-- api-example:start -->\n(.*?)<!-- api-example:end -->", text, re.S)
    assert section, "README.md has no api-example block"
    blocks = re.findall(r"```python\n(.*?)```", section.group(1), re.S)
    assert len(blocks) == 1, "the api-example block holds exactly one fenced python block"
    return blocks[0]


def test_readme_example_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), "README.md api-example", "exec"), {"__name__": "__main__"})
    results = tmp_path / "api-demo" / "results"
    assert sorted(p.name for p in (results / "runs").iterdir()) == ["bitfit", "linear", "lora"]
    assert (results / "leaderboard.md").is_file() and (results / "leaderboard.html").is_file()
    assert "ok" in capsys.readouterr().out


def test_console_script_is_the_cli():
    """The installed `peft-bench` entry point is `cli.entry_point` (as pyproject.toml declares it), which exits
    with `cli.main`'s status."""
    scripts = [ep for ep in metadata.distribution("peft-bench").entry_points if ep.group == "console_scripts"]
    (script,) = [ep for ep in scripts if ep.name == "peft-bench"]
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert script.value == declared["peft-bench"] == "benchmark.cli:entry_point"
    assert script.load() is cli.entry_point
    assert cli.build_parser().format_usage().startswith("usage: peft-bench ")


def test_entry_point_exits_with_mains_status(monkeypatch):
    monkeypatch.setattr(cli, "main", lambda: 3)
    with pytest.raises(SystemExit) as stop:
        cli.entry_point()
    assert stop.value.code == 3


def test_usage_errors_name_peft_bench(capsys):
    assert cli.main(["run"]) == 2
    assert "see `peft-bench run --help`" in capsys.readouterr().err


def test_installed_script_lists_the_methods():
    script = Path(sys.executable).parent / "peft-bench"
    if not script.is_file():
        pytest.skip(f"{script} is not installed (pip install -e .)")
    out = subprocess.run([script, "methods"], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.splitlines() == list_methods()


def test_parse_maps_keywords_to_the_commands_options():
    args = pb.parse(
        "bench", method="linear", pretrained=False, feature_cache=False, quiet=True, seeds=[1, 2], lr_grid=[0.1, 0.01],
        slurm_extra=["account=a", "qos=b"], slurm_gpus_per_job=0, warmup_epochs=None, rank=4, per_task=False,
    )  # fmt: skip
    assert args.no_pretrained and args.no_feature_cache and args.quiet
    assert (args.seeds, args.lr_grid, args.slurm_extra, args.slurm_gpus) == (
        [1, 2],
        (0.1, 0.01),
        ["account=a", "qos=b"],
        0,
    )
    assert args.warmup_epochs is None  # None: the command's default
    assert args.options == ["rank=4", "per_task=False"]  # anything else: a method option (`--set`)
    assert not pb.parse("run", method="linear", task="dtd", pretrained=True).no_pretrained


def test_build_model_is_the_model_run_trains():
    model = pb.build_model("lora", "svhn", rank=2, **TINY)
    assert isinstance(model, PeftModel)
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 10)  # svhn's classes
    assert pb.build_model("lora", "svhn", num_classes=3, rank=2, **TINY)(x).shape == (2, 3)
    report = model.param_report()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == report.tunable + report.head > 0
    # The same seed, the same initial tunable values (as a run seeds before building).
    again = dict(pb.build_model("lora", "svhn", rank=2, **TINY).named_parameters())
    assert all(torch.equal(p, again[n]) for n, p in trainable.items())


def test_run_returns_the_record_it_writes_and_the_cli_would(synth_root, tmp_path, capsys):
    record = pb.run("linear", "svhn", data_root=synth_root, results=tmp_path / "api", seed=3, epochs=1, **TINY)
    path = tmp_path / "api" / "runs" / "linear" / "svhn" / "final-s3.json"
    assert record["status"] == "ok" and json.loads(path.read_text()) == json.loads(json.dumps(record))
    cli_args = argv("run --method linear --task svhn --seed 3 --epochs 1", "--data-root", str(synth_root))
    assert cli.main([*cli_args, "--results", str(tmp_path / "cli")]) == 0
    by_cli = json.loads((tmp_path / "cli" / "runs" / "linear" / "svhn" / "final-s3.json").read_text())
    assert by_cli["config"] == json.loads(json.dumps(record["config"])) and by_cli["test_acc"] == record["test_acc"]


def test_bench_load_results_and_leaderboard(synth_root, tmp_path, capsys):
    results = tmp_path / "results"
    done = pb.bench("linear", ["svhn"], seeds=[42, 44], data_root=synth_root, results=results, epochs=1, **TINY)
    assert sorted(r["seed"] for r in done) == [42, 44] and all(r["status"] == "ok" for r in done)
    assert pb.bench("linear", "svhn", seeds=[42, 44], data_root=synth_root, results=results, epochs=1, **TINY) == []
    runs = pb.load_results(results)
    assert list(runs.columns) == list(runs_frame([]).columns)
    assert sorted(runs.seed) == [42, 44] and set(runs.method) == {"linear"} and runs.acc.notna().all()
    boards = pb.leaderboard(results)
    assert list(boards) == ["vtab1k"] and list(boards["vtab1k"].method) == ["linear"]
    assert (results / "leaderboard.csv").is_file() and (results / "accuracy_vs_params.png").is_file()


def test_synth_writes_a_data_root(tmp_path):
    root = pb.synth(tmp_path / "data", tasks=["camelyon"], per_class=2, image_size=16)
    assert root == tmp_path / "data" and (root / get_task("camelyon").folder / "train800.txt").is_file()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda tmp: pb.build_model("nope", "svhn", **TINY), r"^unknown method 'nope'; known methods: "),
        (lambda tmp: pb.run("linear", "svhn", epochs=0), r"^argument --epochs: must be an integer from 1 to 10000"),
        (lambda tmp: pb.run("linear", "svhn,dtd"), r"names 2 tasks, this command takes one; use `bench` for several"),
        (
            lambda tmp: pb.build_model("linear", "svhn", rank=4, **TINY),
            r"^linear on svhn: linear has no option 'rank'",
        ),
        (lambda tmp: pb.bench("linear", "svhn", quiet="yes"), r"^quiet takes True or False, got 'yes'"),
        (lambda tmp: pb.load_results(tmp), r"^no results in .* run `python -m benchmark bench` first"),
        (lambda tmp: pb.leaderboard(tmp), r"^no results in "),
    ],
    ids=["method", "epochs", "tasks", "option", "flag", "load_results", "leaderboard"],
)
def test_bad_input_is_the_commands_user_error(call, message, tmp_path):
    with pytest.raises(UserError, match=message):
        call(tmp_path)
