"""One resolution of a run's configuration: what a result records is what its module trained, whatever the
command (`run`, `bench`) or launcher (inline, local, slurm), with the per-task switch and the options that reach
the backbone (`drop_path_rate`)."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmark.cli import main
from benchmark.run.backbone import create_backbone
from benchmark.run.module import ClassificationModule
from methods import MethodConfig, get_method, list_methods
from tests.conftest import argv
from tests.test_launch import bench_args, leftovers, one_thread, outcomes, slurm_unavailable  # noqa: F401

# A drop-path rate no method has by default, so a backbone built from the default config shows.
DROP_PATH = 0.2
# Options that keep a method's pipeline short on the tiny backbone: one pruning candidate, no rewind search.
SHORT = {"e2vpt": ["max_token_levels=1", "max_segment_levels=1"], "sct": ["k=8"]}
# Methods with per-task settings (the `per_task` switch) and a task whose settings differ from the defaults.
PER_TASK = [m for m in list_methods() if "per_task" in {f.name for f in dataclasses.fields(get_method(m))}]


def tiny_options(name: str) -> list[str]:
    """The method's `tiny()` config as `--set` options: the fields where it differs from the defaults."""
    cls = get_method(name)
    tiny, default = cls.tiny(), cls()
    out = []
    for f in dataclasses.fields(cls):
        value = getattr(tiny, f.name)
        if f.name == "recipe" or value == getattr(default, f.name):
            continue
        out += [f"{k}={v}" for k, v in value.items()] if isinstance(value, dict) else [f"{f.name}={value}"]
    return out


def sets(options: list[str]) -> list[str]:
    return [a for option in options for a in ("--set", option)]


@pytest.fixture
def trained(monkeypatch) -> list[dict[str, Any]]:
    """Every model built in this test, as built (a copy, before any pruning or training) with the RNG state it
    was built from, and for the ones a `ClassificationModule` trained, what its optimiser and trainer used."""
    builds: list[dict[str, Any]] = []
    build, init, configure = (
        MethodConfig.build,
        ClassificationModule.__init__,
        ClassificationModule.configure_optimizers,
    )

    def recorded_build(self, backbone, num_classes):
        rng = torch.get_rng_state()
        model = build(self, backbone, num_classes)
        builds.append({"config": self, "rng": rng, "model": model, "as_built": copy.deepcopy(model)})
        return model

    def recorded_init(self, model, **kwargs):
        init(self, model, **kwargs)
        next(b for b in builds if b["model"] is model)["module"] = self

    def recorded_configure(self):
        out = configure(self)
        optimizer = out["optimizer"]
        entry = next(b for b in builds if b.get("module") is self)
        entry["optimizer"] = {
            "type": type(optimizer).__name__.lower(),
            "lr": optimizer.defaults["lr"],
            "weight_decay": optimizer.param_groups[0]["weight_decay"],
            "epochs": self.trainer.max_epochs,
            "batch_size": self.trainer.datamodule.batch_size,
        }
        return out

    monkeypatch.setattr(MethodConfig, "build", recorded_build)
    monkeypatch.setattr(ClassificationModule, "__init__", recorded_init)
    monkeypatch.setattr(ClassificationModule, "configure_optimizers", recorded_configure)
    return builds


def drop_path_rates(model: torch.nn.Module) -> list[float]:
    """Each block's stochastic-depth rate (timm's `drop_path1`, wherever a method's wrapper keeps the block)."""
    rates = []
    for block in model.backbone.blocks:
        first = next(m for name, m in block.named_modules() if name.split(".")[-1] == "drop_path1")
        rates.append(float(getattr(first, "drop_prob", 0.0)))
    return rates


def scalars(module: torch.nn.Module) -> dict[str, Any]:
    """A module's plain settings (scales, rates, sizes, flags): what its state dict does not show."""
    kinds = (bool, int, float, str, tuple, type(None))
    return {k: v for k, v in vars(module).items() if not k.startswith("_") and isinstance(v, kinds)}


def check_record_is_what_trained(record: dict[str, Any], run: dict[str, Any]) -> None:
    """The model rebuilt from the record's config (and the RNG state the run built from) is the model that
    trained: module tree, parameter shapes and values, plain settings, the backbone's drop-path rates; and the
    record's recipe is what the optimiser and trainer used."""
    cls = get_method(record["method"])
    config = cls.from_dict(record["config"]["method_config"])
    assert config == run["config"]
    settings = record["config"]
    backbone = create_backbone(settings["backbone"], pretrained=settings["pretrained"],
                               image_size=settings["image_size"], **config.backbone_kwargs())  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(run["rng"])
        rebuilt, used = config.build(backbone, get_task_classes(record)), run["as_built"]
    assert [(n, type(m).__name__) for n, m in rebuilt.named_modules()] == [
        (n, type(m).__name__) for n, m in used.named_modules()
    ]
    assert {n: (p.shape, p.requires_grad) for n, p in rebuilt.named_parameters()} == {
        n: (p.shape, p.requires_grad) for n, p in used.named_parameters()
    }
    state, used_state = rebuilt.state_dict(), used.state_dict()
    assert state.keys() == used_state.keys()
    assert all(torch.equal(state[k], used_state[k]) for k in state), [
        k for k in state if not torch.equal(state[k], used_state[k])
    ]
    assert {n: scalars(m) for n, m in rebuilt.named_modules()} == {n: scalars(m) for n, m in used.named_modules()}
    rate = record["config"]["method_config"].get("drop_path_rate", 0.0)
    depth = len(used.backbone.blocks)
    expected = [x.item() for x in torch.linspace(0, rate, depth)]
    assert drop_path_rates(run["model"]) == pytest.approx(expected) == drop_path_rates(rebuilt)
    recipe = record["config"]["method_config"]["recipe"]
    assert run["optimizer"] == {
        "type": recipe["optimizer"],
        "lr": recipe["lr"],
        "weight_decay": recipe["weight_decay"],
        "epochs": recipe["epochs"],
        "batch_size": recipe["batch_size"],
    }
    assert run["module"].recipe == config.recipe


def get_task_classes(record: dict[str, Any]) -> int:
    from tasks import get_task

    return get_task(record["task"]).num_classes


def final_result(results: Path, method: str, task: str = "camelyon") -> dict[str, Any]:
    return json.loads((results / "runs" / method / task / "final-s42.json").read_text())


def trained_run(builds: list[dict[str, Any]]) -> dict[str, Any]:
    """The last model a module trained: a sweep's final run comes after its grid, dense and rewind runs."""
    return [b for b in builds if "optimizer" in b][-1]


@pytest.mark.slow
@pytest.mark.parametrize("method", list_methods())
def test_every_recorded_field_is_what_the_module_trained(method, synth_root, tmp_path, trained):
    options = tiny_options(method) + SHORT.get(method, [])
    if "drop_path_rate" in {f.name for f in dataclasses.fields(get_method(method))}:
        options.append(f"drop_path_rate={DROP_PATH}")
    args = argv(f"bench --method {method} --tasks camelyon --seeds 42 --data-root {synth_root} --results {tmp_path}",
                "--epochs", "1", "--batch-size", "8", *sets(options))  # fmt: skip
    assert main(args) == 0
    record = final_result(tmp_path, method)
    assert record["status"] == "ok", record["error"]
    check_record_is_what_trained(record, trained_run(trained))


def per_task_task(method: str) -> str:
    """A synthetic task on which the method's per-task settings differ from its defaults."""
    cls = get_method(method)
    return next(t for t in ("camelyon", "svhn") if cls().for_task(t) != cls())


@pytest.mark.slow
@pytest.mark.parametrize("method", PER_TASK)
def test_per_task_false_trains_and_records_the_defaults_and_the_options(method, synth_root, tmp_path, trained):
    task, cls = per_task_task(method), get_method(method)
    options = [*SHORT.get(method, []), "per_task=false"]
    out = tmp_path / "r.json"
    args = argv(f"run --method {method} --task {task} --data-root {synth_root} --out {out}",
                "--epochs", "1", "--batch-size", "8", *sets(options))  # fmt: skip
    assert main(args) == 0
    record = json.loads(out.read_text())
    expected = cls().with_options(dict(o.split("=", 1) for o in options)).with_recipe(epochs=1, batch_size=8)
    assert expected != cls().for_task(task).with_options(dict(o.split("=", 1) for o in options))
    assert record["config"]["method_config"] == json.loads(json.dumps(expected.to_dict()))
    check_record_is_what_trained(record, trained_run(trained))


@pytest.mark.slow
def test_an_option_wins_over_the_per_task_value(synth_root, tmp_path, trained):
    # Convpass's table gives camelyon s = 10 and the centre-tap conv init; the option changes s only.
    out = tmp_path / "r.json"
    args = argv(f"run --method convpass --task camelyon --data-root {synth_root} --out {out}",
                "--epochs", "1", "--batch-size", "8", "--set", "scale=3")  # fmt: skip
    assert main(args) == 0
    record = json.loads(out.read_text())
    assert (record["config"]["method_config"]["scale"], record["config"]["method_config"]["xavier_init"]) == (3, False)
    check_record_is_what_trained(record, trained_run(trained))


# -- every launcher trains the same run -------------------------------------------------------------------------
LAUNCHED = {
    "lora": ["--set", "drop_path_rate=0.3"],
    "convpass": ["--set", "per_task=false", "--set", "scale=3"],
}
LOCAL = ["--launcher", "local", "--workers", "1", "--threads", "1"]
SLURM = ["--launcher", "slurm", "--slurm-gpus-per-job", "0", "--slurm-cpus-per-job", "1", "--slurm-time", "20",
         "--threads", "1"]  # fmt: skip


def launched(method: str, root: Path, results: Path, *extra: str) -> dict[str, tuple]:
    assert main(bench_args(method, "camelyon", root, results, "--seeds", "42", *LAUNCHED[method], *extra)) == 0
    assert not leftovers(results)
    return outcomes(results)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(LAUNCHED))
def test_inline_and_local_train_the_same_run(method, synth_root, tmp_path, one_thread):  # noqa: F811
    inline = launched(method, synth_root, tmp_path / "inline")
    assert inline == launched(method, synth_root, tmp_path / "local", *LOCAL)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(LAUNCHED))
def test_slurm_trains_the_inline_run(method, synth_root, tmp_path, one_thread):  # noqa: F811
    if why := slurm_unavailable():
        pytest.skip(why)
    inline = launched(method, synth_root, tmp_path / "inline")
    assert inline == launched(method, synth_root, tmp_path / "slurm", *SLURM)


@pytest.mark.slow
def test_the_drop_path_option_reaches_the_inline_backbone(synth_root, tmp_path, one_thread):  # noqa: F811
    losses = {}
    for rate in ("0.0", "0.9"):
        results = tmp_path / rate
        assert main(bench_args("lora", "camelyon", synth_root, results, "--seeds", "42", "--set",
                               f"drop_path_rate={rate}")) == 0  # fmt: skip
        losses[rate] = final_result(results, "lora")["train_loss"]
    assert losses["0.0"] != losses["0.9"]


@pytest.mark.parametrize(
    ("command", "option", "message"),
    [
        ("run --method convpass --task camelyon", "per_task=maybe",
         "convpass on camelyon: option per_task takes true or false, got 'maybe'"),
        ("bench --method lora --tasks camelyon", "per_task=false", "lora on camelyon: lora has no option 'per_task'"),
        ("run --method vpt_deep --task svhn", "num_tokens=0", "vpt_deep on svhn: num_tokens=0 must be at least 1"),
    ],
)  # fmt: skip
def test_a_bad_option_is_one_line_and_nothing_is_written(command, option, message, synth_root, tmp_path, capsys):
    assert main(argv(f"{command} --data-root {synth_root} --results {tmp_path / 'r'}", "--set", option)) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "r").exists()
