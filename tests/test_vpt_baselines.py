"""VPT's own baselines as its code runs them: Partial-1 (`partial_1`), Mlp-3 (`mlp_3`) and Sidetune (`sidetune`)."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from benchmark.cli import main
from benchmark.data.arrays import SplitArrays, normalize
from benchmark.run.backbone import create_backbone
from benchmark.run.runner import Settings, extract_features
from methods import get_method
from methods.sidetune import ALEXNET_URL, AlexNetFeatures, alexnet_weights_path
from tests.conftest import argv, tiny_vit

C = 5


def images(n: int = 4, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def build(name: str, **options):
    config = get_method(name).tiny().with_options({k: str(v) for k, v in options.items()})
    torch.manual_seed(0)
    return config.build(tiny_vit(), C)


@pytest.fixture(scope="module")
def vit_b16():
    return create_backbone("vit_base_patch16_224", pretrained=False, device="meta")


# -- parameter counts on ViT-B/16 (the formulas of the module docstrings) -------------------------------------
@pytest.mark.parametrize(
    ("name", "options", "tunable"),
    [
        ("partial_1", {}, 7_087_872 + 1_536),
        ("partial_1", {"blocks": "4"}, 4 * 7_087_872 + 1_536),
        ("mlp_3", {}, 2 * (768 * 768 + 768 + 2 * 768)),
        ("mlp_3", {"norm": "none", "mlp_num": "1"}, 768 * 768 + 768),
        ("sidetune", {}, 2_469_696 + 9_216 * 768 + 1),
    ],
)
def test_counts_on_vit_b16(vit_b16, name, options, tunable):
    config = get_method(name)().with_options(options)
    report = config.build(copy.deepcopy(vit_b16), 397).param_report()
    assert report == config.expected_params(vit_b16, 397)
    assert (report.tunable, report.head, report.backbone) == (tunable, 769 * 397, 85_798_656)


def test_partial_1_trains_the_last_block_on_vit_b16(vit_b16):
    model = get_method("partial_1")().build(copy.deepcopy(vit_b16), 2)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if n.startswith(("backbone.blocks.11.", "backbone.norm."))}
    assert trained == expected | {"head.weight", "head.bias"} and len(expected) == 12 + 2


# -- which parameters train ----------------------------------------------------------------------------------
def step(model: nn.Module, x: torch.Tensor) -> dict[str, bool]:
    """One SGD step; for each parameter, whether it changed."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    nn.functional.cross_entropy(model(x), torch.arange(len(x)) % C).backward()
    opt.step()
    return {n: not torch.equal(p, before[n]) for n, p in model.named_parameters()}


@pytest.mark.parametrize("blocks", [1, 2])
def test_partial_trains_exactly_the_last_blocks_and_the_final_norm(blocks):
    model = build("partial_1", blocks=blocks)
    last = tuple(f"backbone.blocks.{i}." for i in range(3 - blocks, 3))
    changed = step(model, images())
    assert {n for n, c in changed.items() if c} == {
        n for n in changed if n.startswith((*last, "backbone.norm.", "head."))
    }
    assert model.param_report().tunable == blocks * sum(p.numel() for p in model.backbone.blocks[0].parameters()) + 96
    model.eval()
    merged = model.merged_backbone()  # the fine-tuned backbone itself
    torch.testing.assert_close(model.head(merged.forward_head(merged.forward_features(images()), pre_logits=True)),
                               model(images()), rtol=0, atol=0)  # fmt: skip


@pytest.mark.parametrize(("name", "trained"), [("mlp_3", ("mlp.", "head.")), ("sidetune", ("side.", "head."))])
def test_the_backbone_stays_frozen(name, trained):
    model = build(name)
    changed = step(model, images())
    assert not any(c for n, c in changed.items() if n.startswith("backbone."))
    assert all(c for n, c in changed.items() if n.startswith(trained))


# -- Mlp-3 -----------------------------------------------------------------------------------------------------
def test_mlp_3_is_vpt_mlp_head():
    model = build("mlp_3")
    layers = list(model.mlp.projection)
    assert [type(m) for m in layers] == [nn.Linear, nn.ReLU, nn.BatchNorm1d, nn.Dropout] * 2
    assert layers[3].p == 0.1 and model.features_frozen and get_method("mlp_3").model_cls.features_frozen
    assert model.head.bias.eq(-math.log(99)).all()  # VPT's head: bias -4.5951
    wide = get_method("mlp_3")().build(create_backbone("test_vit", pretrained=False), C)  # width 64
    assert abs(wide.mlp.projection[0].weight.std().item() - math.sqrt(2 / 64)) < 0.02  # kaiming-normal, fan_out


def test_mlp_3_cached_features_give_the_end_to_end_logits():
    model = build("mlp_3").eval()
    pixels = np.random.default_rng(0).integers(0, 256, (10, 3, 32, 32), dtype=np.uint8)
    features = extract_features(model, SplitArrays("test", pixels, np.zeros(10, dtype=np.int64)),
                                Settings(backbone="test_vit", image_size=32, eval_batch_size=4))  # fmt: skip
    mean, std = torch.tensor((0.485, 0.456, 0.406)), torch.tensor((0.229, 0.224, 0.225))
    with torch.no_grad():
        end_to_end = model(normalize(torch.from_numpy(pixels), mean, std))
        cached = model.forward_head(torch.from_numpy(features.inputs))
    torch.testing.assert_close(cached, end_to_end, rtol=0, atol=1e-5)


# -- Sidetune --------------------------------------------------------------------------------------------------
def test_sidetune_blends_half_and_half_at_init():
    model = build("sidetune").eval()
    assert model.side.alpha.item() == 0.0 and model.side.projection.bias is None
    x = images()
    with torch.no_grad():
        backbone = model.backbone.forward_head(model.backbone.forward_features(x), pre_logits=True)
        side = model.side.projection(model.side.net(nn.functional.interpolate(x, size=(64, 64), mode="bilinear")))
        torch.testing.assert_close(model.forward_features(x), 0.5 * backbone + 0.5 * side, rtol=0, atol=1e-6)


def test_side_network_has_torchvision_alexnet_layout():
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        reference = torchvision.models.alexnet()
    ours = AlexNetFeatures()
    theirs = {k: v.shape for k, v in reference.state_dict().items() if k.startswith("features.")}
    assert {k: v.shape for k, v in ours.state_dict().items()} == theirs
    assert repr(ours.features) == repr(reference.features) and repr(ours.avgpool) == repr(reference.avgpool)
    assert ours(torch.zeros(1, 3, 63, 63)).shape == (1, 9216)


def test_imagenet_side_weights_come_from_the_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ValueError, match=r"^side_weights='imagenet' needs .*alexnet-owt-7be5be79\.pth") as e:
        get_method("sidetune")(side_image_size=64).build(tiny_vit(), C)
    assert ALEXNET_URL in str(e.value) and "\n" not in str(e.value)
    state = {k: torch.randn(v.shape) for k, v in AlexNetFeatures().state_dict().items()}
    alexnet_weights_path().parent.mkdir(parents=True)
    torch.save({**state, "classifier.6.bias": torch.zeros(1000)}, alexnet_weights_path())
    model = get_method("sidetune")(side_image_size=64).build(tiny_vit(), C)
    assert all(torch.equal(v, state[k]) for k, v in model.side.net.state_dict().items())


# -- bad options: one line -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("partial_1", {"blocks": "0"}, "blocks=0 must be at least 1; set blocks=1"),
        ("mlp_3", {"norm": "group"}, "norm='group' is not one of batch, layer, none; set norm='batch'"),
        ("mlp_3", {"dropout": "1.0"}, "dropout=1.0 must be in [0, 1); set dropout=0.1"),
        ("mlp_3", {"mlp_num": "0"}, "mlp_num=0 must be at least 1; set mlp_num=2"),
        ("sidetune", {"side_weights": "random"}, "side_weights='random' is not one of imagenet, none"),
        ("sidetune", {"side_image_size": "32"}, "side_image_size=32 is below AlexNet's smallest input, 63 px"),
    ],
)
def test_bad_options_are_refused_in_one_line(name, options, message):
    with pytest.raises(ValueError) as e:
        get_method(name)().with_options(options)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_backbone_checks_are_one_line():
    with pytest.raises(ValueError, match=r"^blocks=4 exceeds the backbone's depth 3; set blocks=3$"):
        get_method("partial_1")(blocks=4).build(tiny_vit(), C)
    with pytest.raises(
        ValueError, match=r"^side_image_size=0 feeds the backbone's 32-px images .*; set side_image_size=64$"
    ):
        get_method("sidetune")(side_weights="none").build(tiny_vit(), C)


# -- the three through `bench` ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_three_train_through_bench(synth_root, tmp_path, monkeypatch):
    """64-px images (AlexNet's input) and torchvision's weight file (random here) in the torch hub cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    alexnet_weights_path().parent.mkdir(parents=True)
    torch.save(AlexNetFeatures().state_dict(), alexnet_weights_path())
    results = tmp_path / "results"
    args = argv(f"bench --method partial_1,mlp_3,sidetune --tasks camelyon --data-root {synth_root} --results {results}",
                "--epochs", "2", "--batch-size", "32", "--seeds", "42", "--image-size", "64")  # fmt: skip
    assert main(args) == 0
    records = {r["method"]: r for r in (json.loads(p.read_text()) for p in (results / "runs").rglob("*.json"))}
    assert set(records) == {"partial_1", "mlp_3", "sidetune"}
    for method, r in records.items():
        assert r["status"] == "ok", r.get("error")
        config = get_method(method).from_dict(r["config"]["method_config"])
        assert config == get_method(method)().with_recipe(**{k: r["config"]["method_config"]["recipe"][k]
                                                             for k in ("epochs", "batch_size")})  # fmt: skip
        assert r["params"]["tunable"] == config.expected_params(tiny_backbone_64(), 2).tunable
    assert records["mlp_3"]["feature_extraction_s"] is not None  # the frozen features were cached
    assert records["sidetune"]["feature_extraction_s"] is None and records["partial_1"]["feature_extraction_s"] is None
    assert records["sidetune"]["config"]["method_config"]["side_weights"] == "imagenet"
    assert records["partial_1"]["config"]["method_config"]["blocks"] == 1


def tiny_backbone_64():
    return create_backbone("test_vit", pretrained=False, image_size=64, device="meta")
