"""`export --merge`: a run saved with --save-tunable becomes a plain timm checkpoint with equal logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, safe_open

from benchmark.cli import main
from benchmark.run.backbone import create_backbone
from benchmark.run.export import merged_model, rebuild
from methods import get_method
from tests.conftest import argv


def run(synth_root: Path, results: Path, method: str, *extra: str) -> Path:
    """One short final run of `method` on synthetic camelyon with its tunable state saved; its result path."""
    code = main(argv(f"run --method {method} --task camelyon --data-root {synth_root} --results {results}",
                     "--epochs", "2", "--batch-size", "16", "--save-tunable", *extra))  # fmt: skip
    assert code == 0
    return results / "runs" / method / "camelyon" / "final-s42.json"


@pytest.mark.slow
def test_export_merge_end_to_end(synth_root, tmp_path, capsys):
    weights = tmp_path / "test_vit.safetensors"  # a fixed backbone, as pretrained weights are
    from safetensors.torch import save_file

    save_file(create_backbone("test_vit", pretrained=False, init_seed=3).state_dict(), str(weights))
    result = run(synth_root, tmp_path / "results", "peft_lora", "--weights", str(weights), "--set", "r=4")
    record = json.loads(result.read_text())
    assert record["status"] == "ok" and record["tunable_state"] == "final-s42.safetensors"
    state = load_file(str(result.with_suffix(".safetensors")))
    assert sum(v.numel() for v in state.values()) == record["params"]["tunable"] + record["params"]["head"]
    assert not result.with_name("final-s42-init.safetensors").exists()

    capsys.readouterr()
    assert main(["export", "--merge", str(result)]) == 0
    out = result.with_name("final-s42-merged.safetensors")
    printed = capsys.readouterr().out
    assert "peft_lora on camelyon: wrote" in printed and "img_size=32" in printed
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert (meta["architecture"], meta["num_classes"], meta["image_size"]) == ("test_vit", "2", "32")

    # The adapted model, as the run left it, against the exported file loaded the two documented ways.
    model, _ = rebuild(record, result.with_suffix(".safetensors"))
    x = torch.randn(6, 3, 32, 32)
    by_state = timm.create_model("test_vit", num_classes=2, img_size=32)
    by_state.load_state_dict(load_file(str(out)))
    by_timm = timm.create_model("test_vit", num_classes=2, img_size=32, pretrained=True,
                                pretrained_cfg_overlay=dict(file=str(out), num_classes=2))  # fmt: skip
    assert type(by_state) is timm.models.vision_transformer.VisionTransformer
    assert sum(p.numel() for p in by_state.parameters()) == record["params"]["backbone"] + record["params"]["head"]
    with torch.no_grad():
        expected = model(x)
        for plain in (by_state.eval(), by_timm.eval()):
            assert (plain(x) - expected).abs().max() < 1e-5
    # Not the frozen backbone: training moved the logits away from it.
    frozen = get_method("linear")().build(create_backbone("test_vit", weights=weights, image_size=32), 2).eval()
    frozen.head.load_state_dict(model.head.state_dict())
    with torch.no_grad():
        assert (frozen(x) - expected).abs().max() > 1e-6


@pytest.mark.slow
def test_export_refuses_what_it_cannot_merge(synth_root, tmp_path, capsys):
    results = tmp_path / "results"
    convpass = run(synth_root, results, "convpass")
    capsys.readouterr()
    assert main(["export", "--merge", str(convpass)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "convpass cannot be merged" in err, err
    assert not list(convpass.parent.glob("*merged*"))

    plain = results / "runs" / "peft_ia3" / "camelyon" / "final-s42.json"
    assert main(argv(f"run --method peft_ia3 --task camelyon --data-root {synth_root} --results {results}",
                     "--epochs", "1")) == 0  # fmt: skip
    for args, message in [
        (["export", str(plain)], "pass --merge"),
        (["export", "--merge", str(plain)], "has no saved tunable state (final-s42.safetensors); run it again"),
        (["export", "--merge", str(tmp_path / "nope.json")], "nope.json does not exist; pass a run's result JSON"),
    ]:
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


def test_merged_model_of_the_linear_probe_is_the_backbone_with_its_head():
    backbone = create_backbone("test_vit", pretrained=False, image_size=32)
    model = get_method("linear")().build(backbone, 3).eval()
    merged = merged_model(model, 3, "linear").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model(x), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def saved_run(synth_root, tmp_path_factory) -> Path:
    """One short peft_lora run saved with --save-tunable on a weights file; tests copy it before changing it."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("saved")
    weights = root / "test_vit.safetensors"
    save_file(create_backbone("test_vit", pretrained=False, init_seed=3).state_dict(), str(weights))
    code = main(argv(f"run --method peft_lora --task camelyon --data-root {synth_root} --results {root / 'results'}",
                     "--epochs", "1", "--batch-size", "16", "--save-tunable", "--weights", str(weights)))  # fmt: skip
    assert code == 0
    return root / "results" / "runs" / "peft_lora" / "camelyon" / "final-s42.json"


def files_of(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(capsys, args: list[str], message: str) -> None:
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


@pytest.mark.parametrize(
    ("out", "message"),
    [
        (lambda run: run, "is the run's result ("),
        (lambda run: run.with_suffix(".safetensors"), "is the run's tunable state ("),
        (lambda run: run.parent / ".." / "camelyon" / "final-s42.json", "is the run's result ("),
        (lambda run: run.parents[4] / "test_vit.safetensors", "is the backbone's weights file ("),
        (lambda run: run.parents[4] / "link" / "final-s42.safetensors", "is the run's tunable state ("),
        (lambda run: run.parents[4] / "state-link.safetensors", "is the run's tunable state ("),
    ],
    ids=["result", "state", "dotdot", "weights", "symlinked-folder", "symlink"],
)
def test_export_never_writes_over_an_input(saved_run, out, message, capsys):
    root = saved_run.parents[4]
    (root / "link").unlink(missing_ok=True)
    (root / "link").symlink_to(saved_run.parent, target_is_directory=True)
    (root / "state-link.safetensors").unlink(missing_ok=True)
    (root / "state-link.safetensors").symlink_to(saved_run.with_suffix(".safetensors"))
    before = files_of(root)
    refused(capsys, ["export", "--merge", str(saved_run), "--out", str(out(saved_run))], message)
    assert files_of(root) == before
    assert (root / "state-link.safetensors").is_symlink()


def test_export_to_an_existing_directory_is_refused(saved_run, tmp_path, capsys):
    refused(capsys, ["export", "--merge", str(saved_run), "--out", str(tmp_path)], f"--out {tmp_path} is a directory")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: data[: len(data) // 2], "is not a readable tunable state (Error while deserializing header"),
        (lambda data: b"", "is not a readable tunable state"),
        (lambda data: b"\x89garbage" * 40, "is not a readable tunable state"),
    ],
    ids=["truncated", "empty", "garbage"],
)
def test_a_damaged_tunable_state_is_refused_in_one_line(saved_run, tmp_path, damage, message, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(saved_run.parent, run_dir)
    state = run_dir / "final-s42.safetensors"
    state.write_bytes(damage(state.read_bytes()))
    before = files_of(tmp_path)
    refused(capsys, ["export", "--merge", str(run_dir / "final-s42.json")], message)
    assert files_of(tmp_path) == before


@pytest.mark.parametrize("name", ["../../x.safetensors", "/tmp/x.safetensors", "sub/final-s42.safetensors"])
def test_a_state_name_outside_the_run_folder_is_refused(saved_run, tmp_path, name, capsys):
    run_dir = tmp_path / "a" / "b" / "run"
    shutil.copytree(saved_run.parent, run_dir)
    (run_dir / "sub").mkdir()
    shutil.copy(run_dir / "final-s42.safetensors", run_dir / "sub" / "final-s42.safetensors")
    result = run_dir / "final-s42.json"
    result.write_text(json.dumps({**json.loads(result.read_text()), "tunable_state": name}))
    before = files_of(tmp_path)
    refused(capsys, ["export", "--merge", str(result)], f"names its tunable state {name!r}, which is not a file in")
    assert files_of(tmp_path) == before
