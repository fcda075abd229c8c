"""Method plugins: a method of another installed distribution (a `peft_bench.methods` entry point) is listed, checked,
swept (inline and by local workers) and reported as a built-in one; a broken plugin costs one warning line and
breaks nothing else.

The plugins are installed without a network: a package folder beside a `<name>-<version>.dist-info` folder (METADATA,
entry_points.txt) in a directory on the path, which is what pip leaves in site-packages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

import methods
from benchmark.cli import main
from methods import _registry as registry
from tests.conftest import argv

PROJECT = Path(__file__).resolve().parent.parent
PACKAGES = ("tinyplug", "brokenplug", "clashplug")

# A real method on the contract: one learnable scale per channel of the final norm's output (D parameters).
TINYPLUG = '''
"""tinyplug: a learnable scale per channel of the ViT's final norm output."""

import copy
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from methods import MethodConfig, ParamReport, PeftModel, Recipe, TunableModule, backbone_report, register_method


class ChannelScale(TunableModule):
    def __init__(self, dim, init):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), init))


class TinyScaleModel(PeftModel):
    def __init__(self, backbone, num_classes, config):
        super().__init__(backbone, num_classes, head_init="torch")
        self.tiny_scale = ChannelScale(backbone.num_features, config.init)

    def forward_features(self, x):
        tokens = self.backbone.forward_features(x) * self.tiny_scale.scale  # [B, N, D]: the final norm's output
        return self.backbone.forward_head(tokens, pre_logits=True)

    def merged_backbone(self):
        merged = copy.deepcopy(self.backbone)  # norm(x)·s = (γ·s)·x̂ + β·s
        with torch.no_grad():
            merged.norm.weight.mul_(self.tiny_scale.scale)
            merged.norm.bias.mul_(self.tiny_scale.scale)
        return merged


def adamw_recipe():
    return Recipe(optimizer="adamw", lr=1e-3, weight_decay=1e-4, lr_grid=(1e-3, 1e-2), wd_grid=(0.0, 1e-4))


@register_method("tiny_scale")
@dataclass
class TinyScaleConfig(MethodConfig):
    """A scale per channel of the final norm's output: D parameters (768 on ViT-B/16).

    Attributes:
        init: the scales' initial value (1: the frozen backbone's features).
    """

    identity_at_init: ClassVar[bool] = True
    families: ClassVar[tuple[str, ...]] = ("vit", "swin")

    recipe: Recipe = field(default_factory=adamw_recipe)
    init: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.init < math.inf:
            raise ValueError(f"init must be positive, got {self.init}; set e.g. init=1")

    def create(self, backbone, num_classes):
        return TinyScaleModel(backbone, num_classes, self)

    def expected_params(self, backbone, num_classes) -> ParamReport:
        return backbone_report(backbone, num_classes, backbone.num_features)


def not_a_method():
    """What a mistaken entry point points at."""
'''

# The class form of an entry point: an undecorated config, registered under the entry point's name.
TINYPLUG_SHIFT = '''
from dataclasses import dataclass

import torch
from torch import nn

from methods import backbone_report
from tinyplug import TinyScaleConfig, TinyScaleModel


class TinyScaleShiftModel(TinyScaleModel):
    def __init__(self, backbone, num_classes, config):
        super().__init__(backbone, num_classes, config)
        self.tiny_scale.shift = nn.Parameter(torch.zeros(backbone.num_features))

    def forward_features(self, x):
        tokens = self.backbone.forward_features(x) * self.tiny_scale.scale + self.tiny_scale.shift
        return self.backbone.forward_head(tokens, pre_logits=True)

    def merged_backbone(self):
        merged = super().merged_backbone()
        with torch.no_grad():
            merged.norm.bias.add_(self.tiny_scale.shift)
        return merged


@dataclass
class TinyScaleShiftConfig(TinyScaleConfig):
    """A scale and a shift per channel of the final norm's output: 2·D parameters."""

    def create(self, backbone, num_classes):
        return TinyScaleShiftModel(backbone, num_classes, self)

    def expected_params(self, backbone, num_classes):
        return backbone_report(backbone, num_classes, 2 * backbone.num_features)
'''

# A plugin registering one method, then a built-in's name: its import fails, and neither is left registered.
CLASHPLUG = """
from dataclasses import dataclass

from methods import MethodConfig, register_method


@register_method("clash_first")
@dataclass
class First(MethodConfig):
    pass


@register_method("bitfit")
@dataclass
class MyBitFit(MethodConfig):
    pass
"""

GOOD = {
    "tinyplug": ("0.1", {"__init__.py": TINYPLUG, "shift.py": TINYPLUG_SHIFT},
                 ["tiny_scale = tinyplug", "tiny_scale_shift = tinyplug.shift:TinyScaleShiftConfig"]),
}  # fmt: skip
BAD = {
    "brokenplug": ("0.2", {"__init__.py": "import a_module_that_is_not_installed\n"},
                   ["broken = brokenplug", "not_a_method = tinyplug:not_a_method",
                    "scale_again = tinyplug:TinyScaleConfig"]),
    "clashplug": ("0.3", {"__init__.py": CLASHPLUG}, ["clash = clashplug"]),
}  # fmt: skip
WARNINGS = {
    "broken": "'broken = brokenplug' of brokenplug 0.2: importing it failed (ModuleNotFoundError: No module named "
    "'a_module_that_is_not_installed'); fix the plugin or install what it needs, or uninstall brokenplug",
    "not_a_method": "of brokenplug 0.2: tinyplug:not_a_method is a function, not a module or a MethodConfig subclass",
    "scale_again": "of brokenplug 0.2: TinyScaleConfig is registered as 'tiny_scale'; name the entry point "
    "'tiny_scale'",
    "clash": "'clash = clashplug' of clashplug 0.3: method 'bitfit' is already registered by the built-in "
    "BitFitConfig; rename the plugin's method, or uninstall clashplug",
}


def install(root: Path, dists: dict[str, tuple[str, dict[str, str], list[str]]]) -> Path:
    """Write each distribution's package and its dist-info folder under `root`, as pip would in site-packages."""
    for name, (version, files, entry_points) in dists.items():
        for file, text in files.items():
            (root / name).mkdir(parents=True, exist_ok=True)
            (root / name / file).write_text(textwrap.dedent(text))
        info = root / f"{name}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text("[peft_bench.methods]\n" + "\n".join(entry_points) + "\n")
    return root


@pytest.fixture(scope="module")
def plugin_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plugins")
    return {"good": install(root / "good", GOOD), "bad": install(root / "bad", BAD)}


def pythonpath(*dirs: Path) -> str:
    return os.pathsep.join([*map(str, dirs), *filter(None, [os.environ.get("PYTHONPATH")])])


def python(*args: str, path: str) -> subprocess.CompletedProcess:
    """A fresh interpreter in the project with the plugins of `path` installed."""
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run([sys.executable, *args], cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def installed(plugin_dirs, monkeypatch):
    """Install plugin directories into this process (and the environment its workers inherit), as if `methods` was
    imported with them on the path; the registry and the modules imported are restored afterwards."""

    def install_dirs(*kinds: str) -> None:
        dirs = [plugin_dirs[k] for k in kinds]
        for d in reversed(dirs):
            monkeypatch.syspath_prepend(str(d))
        monkeypatch.setenv("PYTHONPATH", pythonpath(*dirs))
        for attr in ("_METHODS", "_ORIGINS", "_SKIPPED"):
            monkeypatch.setattr(registry, attr, dict(getattr(registry, attr)))
        monkeypatch.setattr(registry, "_PENDING", None)
        methods.load_plugins()

    yield install_dirs
    for module in [m for m in sys.modules if m.split(".")[0] in PACKAGES]:
        del sys.modules[module]


def test_methods_lists_plugins_with_their_distribution_and_skips_broken_ones(plugin_dirs):
    out = python("-m", "benchmark", "methods", path=pythonpath(plugin_dirs["good"], plugin_dirs["bad"]))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "tiny_scale  (plugin: tinyplug 0.1)" in lines and "tiny_scale_shift  (plugin: tinyplug 0.1)" in lines
    assert {"bitfit", "linear", "lora"} <= set(lines) and not {"clash_first", "broken"} & {
        ln.split()[0] for ln in lines
    }
    warnings = out.stderr.splitlines()
    assert len(warnings) == len(WARNINGS), out.stderr
    for line, expected in zip(warnings, WARNINGS.values(), strict=True):
        assert line.startswith("warning: skipped the method plugin '") and expected in line, line


def test_a_plugin_imported_before_methods_registers_when_looked_up(plugin_dirs):
    """The plugin's own tests import it first: `methods` then loads while the plugin is half imported, so its entry
    points wait for the first lookup."""
    script = (
        "import tinyplug.shift, methods; "
        "print(methods.get_method('tiny_scale_shift').name, methods.method_origin('tiny_scale'), "
        "methods.get_method('tiny_scale') is tinyplug.TinyScaleConfig)"
    )
    out = python("-c", script, path=pythonpath(plugin_dirs["good"]))
    assert (out.returncode, out.stdout, out.stderr) == (0, "tiny_scale_shift tinyplug 0.1 True\n", "")


def test_params_counts_a_plugin_method_and_checks_its_options(installed, capsys):
    installed("good")
    assert methods.method_origin("tiny_scale_shift") == "tinyplug 0.1" and methods.method_origin("lora") is None
    base = ["params", "--backbone", "test_vit", "--image-size", "32", "--tasks", "camelyon"]
    assert main([*base, "--methods", "tiny_scale,tiny_scale_shift", "--json", "--set", "init=0.5"]) == 0
    rows = {r["method"]: r for r in json.loads(capsys.readouterr().out)}
    assert (rows["tiny_scale"]["tunable"], rows["tiny_scale_shift"]["tunable"]) == (64, 128)  # test_vit: D = 64
    assert rows["tiny_scale"]["head"] == 65 * 2
    for option, message in [
        ("nope=1", "tiny_scale has no option 'nope'; options: init"),
        ("init=-1", "init must be positive, got -1.0; set e.g. init=1"),
        ("init=big", "init"),
    ]:
        assert main([*base, "--methods", "tiny_scale", "--set", option]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err


def test_a_skipped_plugin_says_why_when_its_method_is_asked_for(installed, caplog):
    installed("good", "bad")
    assert {"tiny_scale", "tiny_scale_shift"} <= set(methods.list_methods())
    assert not {"broken", "clash_first", "scale_again"} & set(methods.list_methods())
    assert methods.get_method("bitfit").__module__ == "methods.bitfit"
    assert len(caplog.records) == len(WARNINGS) and all("\n" not in r.getMessage() for r in caplog.records)
    skipped = r"the method plugin 'broken = brokenplug' of brokenplug 0\.2 was skipped: importing it failed"
    with pytest.raises(
        methods.UnknownMethodError, match=rf"unknown method 'broken'; known methods: .*tiny_scale.*; {skipped}"
    ):
        methods.get_method("broken")
    methods.load_plugins()  # each entry point is tried once per process
    assert len(caplog.records) == len(WARNINGS)


@pytest.mark.slow
def test_a_plugin_method_is_swept_inline_and_by_local_workers_then_reported(installed, synth_root, tmp_path):
    installed("good")
    results = tmp_path / "results"
    sweep = f"bench --tasks camelyon --data-root {synth_root} --results {results}"
    fast = ["--epochs", "1", "--batch-size", "32", "--seeds", "42"]
    assert main(argv(f"{sweep} --method tiny_scale", *fast)) == 0
    # A worker is a fresh process: it registers the class entry point itself, and unpickles its config by name.
    workers = ["--launcher", "local", "--workers", "1", "--threads", "1"]
    assert main(argv(f"{sweep} --method tiny_scale_shift", *fast, *workers)) == 0
    for method, tunable in [("tiny_scale", 64), ("tiny_scale_shift", 128)]:
        record = json.loads((results / "runs" / method / "camelyon" / "final-s42.json").read_text())
        assert record["status"] == "ok", record.get("error")
        assert (record["config"]["method"], record["params"]["tunable"]) == (method, tunable)
    assert main(["leaderboard", "--results", str(results)]) == 0
    board = pd.read_csv(results / "leaderboard.csv")
    assert set(board.method) == {"tiny_scale", "tiny_scale_shift"}
    assert "tiny_scale_shift" in (results / "leaderboard.md").read_text()


@pytest.mark.slow
def test_the_contract_tests_pick_a_plugin_method_up(plugin_dirs):
    """The contract tests loop over the registry: an installed plugin's methods are checked like the built-in ones
    (shape, gradients, frozen weights, parameter formula, identity at init, state round-trip, determinism; on Swin)."""
    contract = ["tests/test_methods.py", "tests/test_swin_methods.py", "-k", "tiny_scale"]
    out = python("-m", "pytest", "-q", "-p", "no:cacheprovider", *contract, path=pythonpath(plugin_dirs["good"]))
    assert out.returncode == 0 and " passed" in out.stdout, out.stdout[-3000:]  # 5: nothing collected
