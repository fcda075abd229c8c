"""The papers' other backbones: the preset table, MAE's and MoCo v3's checkpoints converted to timm's ViT (made here
in their official layouts), Swin's image sizes, and Swin and the presets taken by name by `params`, `perf` and
`bench`."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import timm
import torch
import torch.nn.functional as F

from benchmark.cli import main
from benchmark.commands.options import check_image_size
from benchmark.core.errors import UserError
from benchmark.run import presets
from benchmark.run.backbone import TINY_SWIN, create_backbone, meta_backbone
from benchmark.run.checkpoints import mocov3_state
from tests.conftest import argv

SIZE = 32  # test_vit at 32 px: 16 px patches, a 2×2 grid
MAE = "vit_base_patch16_224.mae"
MOCO = "vit_base_patch16_224.mocov3"
SWIN_B = "swin_base_patch4_window7_224"
SWIN_B_PARAMS = 86_743_224  # headless Swin-B: timm's 87,768,224 with its 1000-class head, less 1024·1000 + 1000
VIT_B_PARAMS = 85_798_656


@pytest.fixture
def tiny_presets(monkeypatch):
    """The MAE and MoCo v3 presets on the tiny `test_vit` (tags timm does not know, as MoCo v3's), so the whole
    path (name → preset → conversion → strict load) runs on a checkpoint made in the test."""
    mae, moco = presets.preset_for(MAE), presets.preset_for(MOCO)
    cfg = {"num_classes": 0, "input_size": (3, SIZE, SIZE)}
    tiny = (
        replace(mae, name="test_vit.mae_tiny", pretrained_cfg=cfg),
        replace(moco, name="test_vit.mocov3_tiny", pretrained_cfg=cfg),
    )
    monkeypatch.setattr(presets, "PRESETS", presets.PRESETS + tiny)
    return tiny[0].name, tiny[1].name


def _source(seed: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=SIZE)
    for p in model.parameters():  # no parameter at its init constant (LayerNorm 1 and 0), so a skipped one shows
        p.data.normal_(0, 0.2)
    return model.eval()


def _images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def _one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


# -- the preset table ---------------------------------------------------------------------------------------
def test_backbones_command_lists_every_preset(capsys):
    assert main(["backbones", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by = {r["name"]: r for r in rows}
    assert set(by) == {"vit_base_patch16_224.orig_in21k", "swin_base_patch4_window7_224.ms_in22k", MAE, MOCO}
    assert {r["family"] for r in rows} == {"vit", "swin"} and by["swin_base_patch4_window7_224.ms_in22k"]["family"]
    assert by[MOCO]["reference"] == "vit_b16_mocov3" and "linear-vit-b-300ep.pth.tar" in by[MOCO]["weights"]
    assert "fc_norm" in by[MAE]["pooling"] and "VPT" in by[MAE]["papers"]
    assert all(r["normalization"] and r["title"] for r in rows)
    assert main(["backbones"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in by) and "vit_b16_mae" in out


def test_mae_preset_pools_patches_through_a_fresh_fc_norm():
    model = meta_backbone(MAE)
    assert model.global_pool == "avg" and isinstance(model.fc_norm, torch.nn.LayerNorm)
    assert isinstance(model.norm, torch.nn.Identity)
    assert create_backbone(MAE, pretrained=False, device="meta", global_pool="token").global_pool == "token"
    assert meta_backbone("vit_base_patch16_224").global_pool == "token"  # not a preset: as timm builds it


# -- MAE ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["official", "hub"])
def test_mae_checkpoint_loads_with_norm_dropped_and_identity_fc_norm(tmp_path, tiny_presets, layout):
    source = _source()
    state = {k: v.clone() for k, v in source.state_dict().items()}
    assert "norm.weight" in state and "fc_norm.weight" not in state
    path = tmp_path / "mae_pretrain.pth"
    torch.save({"model": state} if layout == "official" else state, path)  # the release file keeps it under model
    model = create_backbone(tiny_presets[0], weights=path, image_size=SIZE).eval()
    loaded = model.state_dict()
    assert "norm.weight" not in loaded
    assert torch.equal(loaded["fc_norm.weight"], torch.ones(64)) and torch.equal(
        loaded["fc_norm.bias"], torch.zeros(64)
    )
    for k, v in state.items():
        if not k.startswith("norm."):
            assert torch.equal(loaded[k], v), k
    source.norm = torch.nn.Identity()  # the encoder's tokens before its final norm
    with torch.no_grad():
        tokens = source.forward_features(_images())
        expected = F.layer_norm(tokens[:, 1:].mean(1), (64,), eps=1e-6)  # patches only, affine-free norm
        assert torch.allclose(model(_images()), expected, atol=1e-5)


def test_mae_checkpoint_with_other_keys_is_refused_in_one_line(tmp_path, tiny_presets):
    state = dict(_source().state_dict())
    del state["norm.weight"], state["norm.bias"]
    state["decoder_embed.weight"] = torch.zeros(4, 4)
    torch.save({"model": state}, tmp_path / "other.pth")
    with pytest.raises(UserError) as e:
        create_backbone(tiny_presets[0], weights=tmp_path / "other.pth", image_size=SIZE)
    text = _one_line(e)
    assert "not a MAE checkpoint" in text and "norm.weight" in text and "decoder_embed.weight" in text


# -- MoCo v3 ------------------------------------------------------------------------------------------------
def _sincos(grid: int, dim: int) -> torch.Tensor:
    """A table of MoCo v3's kind (its vits.py: a quarter of the channels each for sin and cos of the two grid
    coordinates at frequencies 1/10000^(i/(dim/4))) behind a zero row for the CLS token; the suite carries the
    checkpoint's own table, so only its zero CLS slot matters here."""
    ys, xs = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    a, b = ys.flatten()[:, None] * omega, xs.flatten()[:, None] * omega
    table = torch.cat([a.sin(), a.cos(), b.sin(), b.cos()], dim=1).float()
    return torch.cat([torch.zeros(1, dim), table])[None]


def _moco_source() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    source = _source(seed=5)
    source.pos_embed.data = _sincos(SIZE // 16, 64)
    return source, {k: v.clone() for k, v in source.state_dict().items()}


def _moco_features(state: dict[str, torch.Tensor], blocks: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """MoCo v3's ViT forward on its own checkpoint: conv patches, CLS in front, + pos_embed, blocks, norm, CLS."""
    patches = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=16)
    seq = torch.cat([state["cls_token"].expand(len(x), -1, -1), patches.flatten(2).transpose(1, 2)], dim=1)
    seq = blocks(seq + state["pos_embed"])
    return F.layer_norm(seq, (64,), state["norm.weight"], state["norm.bias"], eps=1e-6)[:, 0]


def _linear_checkpoint(state: dict[str, torch.Tensor], classes: int = 1000) -> dict:
    """The layout of linear-vit-b-300ep.pth.tar: DDP keys under state_dict, with the linear classifier."""
    entries = dict(state, **{"head.weight": torch.randn(classes, 64), "head.bias": torch.zeros(classes)})
    return {"epoch": 90, "arch": "vit_base", "state_dict": {f"module.{k}": v for k, v in entries.items()},
            "best_acc1": torch.tensor(76.7), "optimizer": {"state": {}, "param_groups": []}}  # fmt: skip


def _pretraining_checkpoint(state: dict[str, torch.Tensor]) -> dict:
    """The layout of a MoCo v3 pre-training checkpoint: both encoders (with projection MLPs) and the predictor."""
    out = {}
    for encoder in ("base_encoder", "momentum_encoder"):
        other = {k: v + 1 for k, v in state.items()} if encoder == "momentum_encoder" else state
        out |= {f"module.{encoder}.{k}": v for k, v in other.items()}
        out |= {
            f"module.{encoder}.head.0.weight": torch.randn(32, 64),
            f"module.{encoder}.head.3.weight": torch.randn(8, 32),
        }
    out |= {"module.predictor.0.weight": torch.randn(32, 8)}
    return {"epoch": 300, "arch": "vit_base", "state_dict": out}


@pytest.mark.parametrize("make", [_linear_checkpoint, _pretraining_checkpoint])
def test_mocov3_checkpoint_converts_loads_and_gives_the_sources_features(tmp_path, tiny_presets, make):
    source, state = _moco_source()
    assert torch.equal(state["pos_embed"][0, 0], torch.zeros(64))  # MoCo v3's zero CLS slot
    path = tmp_path / "linear-vit-b-300ep.pth.tar"
    torch.save(make(state), path)
    model = create_backbone(tiny_presets[1], weights=path, image_size=SIZE).eval()
    loaded = model.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())
    x = _images()
    with torch.no_grad():
        expected = _moco_features(state, source.blocks, x)
        assert torch.allclose(model(x), expected, atol=1e-5)
        assert torch.allclose(model(x), source(x), atol=1e-6)


def _wrong(state: dict[str, torch.Tensor], case: str) -> dict:
    if case == "other prefix":
        return {"state_dict": {f"encoder.{k}": v for k, v in state.items()}}
    if case == "half":
        return {"state_dict": {f"module.{k}": v for k, v in state.items() if not k.startswith("blocks.1")}}
    if case == "learned pos_embed":
        return {"state_dict": {f"module.{k}": v + (k == "pos_embed") for k, v in state.items()}}
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["other prefix", "half", "learned pos_embed"])
def test_mocov3_checkpoint_with_another_layout_is_refused_in_one_line(tmp_path, tiny_presets, case):
    torch.save(_wrong(_moco_source()[1], case), tmp_path / "w.pth.tar")
    with pytest.raises(UserError) as e:
        create_backbone(tiny_presets[1], weights=tmp_path / "w.pth.tar", image_size=SIZE)
    text = _one_line(e)
    assert "not a MoCo v3 checkpoint" in text and "expected the official MoCo v3 layout" in text
    assert "module.base_encoder." in text


def test_mocov3_conversion_drops_prefixes_and_heads():
    source, state = _moco_source()
    converted = mocov3_state(_linear_checkpoint(state)["state_dict"], source)
    assert converted.keys() == state.keys()


def test_mocov3_without_a_file_says_where_the_weights_come_from(synth_root, tmp_path, capsys):
    with pytest.raises(UserError) as e:
        create_backbone(MOCO)
    assert "no weights on the Hugging Face Hub" in _one_line(e) and "--weights linear-vit-b-300ep.pth.tar" in str(
        e.value
    )
    assert meta_backbone(MOCO).global_pool == "token"  # the name resolves (a pretrained cfg timm lacks)
    args = argv(
        f"bench --method linear --tasks camelyon --data-root {synth_root} --results {tmp_path}", "--epochs", "1"
    )
    args[args.index("--backbone") + 1] = MOCO
    args.remove("--no-pretrained")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--weights linear-vit-b-300ep.pth.tar" in err


# -- Swin: image sizes, params, perf, bench -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("backbone", "size", "fits"),
    [(SWIN_B, 224, True), (SWIN_B, 448, True), (SWIN_B, 160, False), (SWIN_B, 230, False),
     (TINY_SWIN, 32, True), (TINY_SWIN, 64, True), (TINY_SWIN, 48, False), (TINY_SWIN, 33, False)],
)  # fmt: skip
def test_swin_image_size_must_fit_every_stages_windows(backbone, size, fits):
    if fits:
        check_image_size(backbone, size)
        return
    with pytest.raises(UserError) as e:
        check_image_size(backbone, size)
    text = _one_line(e)
    suggested = int(text.rsplit("use e.g. ", 1)[1])
    check_image_size(backbone, suggested)  # the size it suggests fits
    assert suggested == (224 if backbone == SWIN_B else 32)


def test_params_take_swin_and_the_presets_by_name(capsys):
    assert main(["params", "--backbone", SWIN_B, "--method", "linear", "--tasks", "cifar100,dtd", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["task"], r["tunable"], r["head"], r["backbone"]) for r in rows] == [
        ("cifar100", 0, 1025 * 100, SWIN_B_PARAMS), ("dtd", 0, 1025 * 47, SWIN_B_PARAMS)
    ]  # fmt: skip
    for name in (MAE, MOCO):
        assert main(["params", "--backbone", name, "--method", "full", "--tasks", "cifar100", "--json"]) == 0
        (row,) = json.loads(capsys.readouterr().out)
        assert row["backbone"] == row["tunable"] == VIT_B_PARAMS and row["head"] == 769 * 100


def test_perf_floor_on_swin_is_its_plain_forward(tmp_path, capsys):
    args = ["perf", "--backbone", TINY_SWIN, "--quiet", "--warmup", "1", "--repeats", "1", "--eval-repeats", "1"]
    args += ["--eval-batch-size", "4", "--batch-size", "4", "--methods", "linear", "--task", "svhn"]
    assert main([*args, "--out", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    grid = (32 // 2) ** 2
    assert report["backbone"] == TINY_SWIN
    assert [f["tokens"] for f in report["floors"]] == [grid] and report["floors"][0]["step_ms"] > 0
    (row,) = report["rows"]
    assert row["tokens"] == grid and row["x_floor"] > 0 and row["eval_images_per_s"] > 0


def test_bench_trains_linear_on_the_tiny_swin_and_records_it(synth_root, tmp_path):
    results = tmp_path / "results"
    args = argv(f"bench --method linear --tasks camelyon --data-root {synth_root} --results {results}")
    args[args.index("--backbone") + 1] = TINY_SWIN
    assert main([*args, "--epochs", "1", "--batch-size", "32", "--seeds", "42"]) == 0
    (path,) = results.glob("runs/linear/camelyon/final-*.json")
    result = json.loads(path.read_text())
    assert result["status"] == "ok", result.get("error")
    assert result["config"]["backbone"] == TINY_SWIN and result["config"]["image_size"] == 32
    swin = create_backbone(TINY_SWIN, pretrained=False)
    assert result["params"]["backbone"] == sum(p.numel() for p in swin.parameters())
    assert result["params"]["head"] == (swin.num_features + 1) * 2 and math.isfinite(result["test_acc"])
