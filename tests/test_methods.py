"""The method contract, checked for every registered method (parametrised over `list_methods()`)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import timm
import torch

import methods
from benchmark.data.arrays import SplitArrays
from benchmark.run.backbone import create_backbone
from benchmark.run.runner import Settings, extract_features
from methods import MethodConfig, PeftModel, Recipe, get_method, list_methods, vit_param_count
from tests.conftest import tiny_vit

NUM_CLASSES = 5
ALL = list_methods()


def build(name: str, seed: int = 0, num_classes: int = NUM_CLASSES) -> tuple[MethodConfig, PeftModel]:
    config = get_method(name).tiny()
    backbone = tiny_vit(seed=0)
    torch.manual_seed(seed)
    return config, config.build(backbone, num_classes)


def images(batch: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_registry_holds_the_foundation_methods():
    assert {"linear", "full"} <= set(ALL)
    assert sorted(ALL) == ALL
    with pytest.raises(KeyError, match="known methods: .*full.*linear"):
        get_method("nope")


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        methods.register_method("linear")(type("Dup", (MethodConfig,), {}))
    with pytest.raises(ValueError, match="lower_snake"):
        methods.register_method("Bad-Name")


@pytest.mark.parametrize("name", ALL)
def test_output_shape_and_finite(name):
    _, model = build(name)
    logits = model(images())
    assert logits.shape == (4, NUM_CLASSES)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ALL)
def test_gradients_reach_only_trainable_parameters(name):
    _, model = build(name)
    model(images()).logsumexp(-1).sum().backward()
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable, "the head at least is trainable"
    for pname, p in model.named_parameters():
        if id(p) in trainable:
            assert p.requires_grad and p.grad is not None, f"{pname} is trainable but got no gradient"
        else:
            assert not p.requires_grad and p.grad is None, f"{pname} is frozen but got a gradient"


@pytest.mark.parametrize("name", ALL)
def test_frozen_weights_bit_identical_after_a_step(name):
    _, model = build(name)
    trainable = {id(p) for p in model.trainable_parameters()}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in trainable}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) in trainable}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9, weight_decay=0.1)
    torch.nn.functional.cross_entropy(model(images()), torch.arange(4) % NUM_CLASSES).backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen {n} changed"
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


@pytest.mark.parametrize("name", ALL)
def test_param_report_matches_the_formula_tiny(name):
    config, model = build(name)
    assert model.param_report() == config.expected_params(tiny_vit(), NUM_CLASSES)
    report = model.param_report()
    assert report.head == (48 + 1) * NUM_CLASSES
    assert report.backbone == sum(p.numel() for p in tiny_vit().parameters())


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("num_classes", [2, 397])
def test_param_report_matches_the_formula_vit_b16(name, num_classes):
    config = get_method(name)()
    backbone = create_backbone("vit_base_patch16_224", pretrained=False, device="meta", **config.backbone_kwargs())
    model = config.build(copy.deepcopy(backbone), num_classes)
    assert model.param_report() == config.expected_params(backbone, num_classes)
    assert model.param_report().backbone == 85_798_656
    assert model.param_report().head == 769 * num_classes


def test_vit_formula_is_exact_for_vit_b16_and_test_vit():
    with torch.device("meta"):
        vit_b = timm.create_model("vit_base_patch16_224", num_classes=0)
        test_vit = timm.create_model("test_vit", num_classes=0)
    assert vit_param_count(vit_b) == 85_798_656 == sum(p.numel() for p in vit_b.parameters())
    assert vit_param_count(test_vit) == sum(p.numel() for p in test_vit.parameters())


def test_baseline_counts():
    backbone = tiny_vit()
    assert get_method("linear")().build(copy.deepcopy(backbone), 7).param_report().tunable == 0
    full = get_method("full")().build(copy.deepcopy(backbone), 7).param_report()
    assert full.tunable == full.backbone == sum(p.numel() for p in backbone.parameters())


@pytest.mark.parametrize("name", ALL)
def test_tunable_state_round_trip_reproduces_logits(name, tmp_path):
    _, model = build(name, seed=0)
    with torch.no_grad():  # move trained state away from its init so the round trip has something to carry
        for p in model.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.eval()
    x = images()
    expected = model(x)
    path = tmp_path / "tunable.safetensors"
    model.save_tunable(path)
    _, other = build(name, seed=123)
    other.eval()
    assert not torch.allclose(other(x), expected)
    other.load_tunable(path)
    torch.testing.assert_close(other(x), expected, rtol=0, atol=0)
    # A checkpoint holds the method's state and the head, never a frozen backbone weight (methods that wrap
    # a backbone Linear keep their branch under its path, e.g. `backbone.blocks.0.attn.qkv.branch`).
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert (frozen and frozen.isdisjoint(model.tunable_state_dict())) or name == "full"


def test_loading_a_mismatched_state_is_refused():
    _, model = build("linear")
    state = model.tunable_state_dict()
    with pytest.raises(ValueError, match="missing"):
        model.load_tunable_state_dict({})
    state = {k: v[:1] for k, v in state.items()}
    with pytest.raises(ValueError, match="shape"):
        model.load_tunable_state_dict(state)


@pytest.mark.parametrize("name", ALL)
def test_same_seed_gives_identical_logits(name):
    x = images()
    a = build(name, seed=7)[1](x)
    b = build(name, seed=7)[1](x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", ALL)
def test_identity_at_init_where_claimed(name):
    config = get_method(name).tiny()
    if not config.identity_at_init:
        pytest.skip(f"{name} does not claim identity at initialisation")
    backbone = tiny_vit()
    torch.manual_seed(0)
    model = config.build(copy.deepcopy(backbone), NUM_CLASSES)
    reference = get_method("linear")().build(copy.deepcopy(backbone), NUM_CLASSES)
    reference.head.load_state_dict(model.head.state_dict())
    torch.testing.assert_close(model(images()), reference(images()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_config_round_trips_through_json(name):
    config = get_method(name)()
    data = json.loads(json.dumps(config.to_dict()))
    assert get_method(name).from_dict(data) == config
    with pytest.raises(ValueError, match="unknown config keys"):
        get_method(name).from_dict({**data, "bogus": 1})


@pytest.mark.parametrize("name", ALL)
def test_recipe_is_valid_and_has_a_grid(name):
    recipe = get_method(name)().recipe
    assert recipe.epochs == 100 and recipe.lr_grid and recipe.wd_grid


def test_linear_cached_features_match_end_to_end_logits():
    _, model = build("linear")
    arrays = SplitArrays(
        "test",
        np.random.default_rng(0).integers(0, 256, (10, 3, 32, 32), dtype=np.uint8),
        np.zeros(10, dtype=np.int64),
    )
    settings = Settings(backbone="test_vit", image_size=32, eval_batch_size=4)
    features = extract_features(model, arrays, settings)
    from benchmark.data.arrays import normalize

    mean, std = torch.tensor((0.485, 0.456, 0.406)), torch.tensor((0.229, 0.224, 0.225))
    with torch.no_grad():
        end_to_end = model(normalize(torch.from_numpy(arrays.inputs), mean, std))
        cached = model.forward_head(torch.from_numpy(features.inputs))
    torch.testing.assert_close(cached, end_to_end, rtol=0, atol=1e-5)


def test_recipe_schedule_and_validation():
    r = Recipe(lr=0.1, epochs=100, warmup_epochs=10)
    assert r.lr_at(0) == 0.0  # VPT: epoch 0 runs at lr 0
    assert r.lr_at(5) == pytest.approx(0.05)
    assert r.lr_at(10) == pytest.approx(0.1)
    assert r.lr_at(55) == pytest.approx(0.05)
    assert 0 < r.lr_at(99) < 0.001
    assert Recipe(lr=0.1, epochs=1, warmup_epochs=10).lr_at(0) == pytest.approx(0.1)
    for bad in ({"lr": 0}, {"epochs": 0}, {"batch_size": -1}, {"optimizer": "lamb"}, {"weight_decay": -1}):
        with pytest.raises(ValueError):
            Recipe(**bad)


def test_timm_vit_exposes_the_hook_points_methods_rely_on():
    vit = timm.create_model("test_vit", num_classes=0)
    assert isinstance(vit.blocks, torch.nn.Sequential) and vit.num_prefix_tokens == 1
    block = vit.blocks[0]
    for attr in ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"):
        assert hasattr(block, attr), attr
    assert hasattr(block.attn, "qkv") and hasattr(block.mlp, "fc1")
    for attr in ("_pos_embed", "patch_embed", "norm_pre", "norm", "forward_features", "forward_head"):
        assert hasattr(vit, attr), attr
