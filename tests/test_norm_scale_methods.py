"""LN-tune, DiffFit and the LoRA-initialised Pfeiffer adapter (`lora_adapter`) against their specs
(docs/methods/reparameterisation.md, adapters.md): ViT-B/16 counts, what trains, where DiffFit's γ acts, merging, the adapter's
placement and inits, refused options, and one `bench` run of the three."""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from benchmark.cli import main
from benchmark.run.backbone import create_backbone
from methods import NotMergeableError, PeftModel, get_method, vit_param_count
from methods._bottleneck import ResidualBottleneck
from methods._inject import Wrapped
from methods.difffit import BranchScale
from tests.conftest import argv, tiny_vit

NUM_CLASSES = 5
METHODS = ("ln_tune", "difffit", "lora_adapter")


@pytest.fixture(scope="module")
def vit_b16() -> VisionTransformer:
    with torch.device("meta"):
        return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)


def build(name: str, backbone: VisionTransformer | None = None, seed: int = 0, **options) -> PeftModel:
    config = get_method(name).tiny().with_options({k: str(v) for k, v in options.items()})
    torch.manual_seed(seed)
    return config.build(backbone if backbone is not None else tiny_vit(), NUM_CLASSES)


def images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def ids(params) -> set[int]:
    return {id(p) for p in params}


def test_vit_b16_counts(vit_b16):
    def tunable(name: str, **options) -> int:
        config = get_method(name)().with_options({k: str(v) for k, v in options.items()})
        built = config.build(copy.deepcopy(vit_b16), 10).param_report()
        assert built == config.expected_params(vit_b16, 10) and built.backbone == 85_798_656
        return built.tunable

    assert tunable("ln_tune") == 25 * 2 * 768 == 38_400
    assert tunable("difffit") == 102_912 + 19_200 + 18_432 == 140_544
    assert tunable("lora_adapter") == 12 * (1537 * 8 + 768) == 156_768
    assert tunable("lora_adapter", hidden=64) == 12 * (1537 * 64 + 768)


def test_ln_tune_on_the_mae_preset_counts_fc_norm_instead_of_the_final_norm():
    with torch.device("meta"):  # MAE: average pooling, `norm` an Identity, `fc_norm` a LayerNorm
        mae = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, global_pool="avg")
    assert isinstance(mae.norm, nn.Identity) and isinstance(mae.fc_norm, nn.LayerNorm)
    config = get_method("ln_tune")()
    model = config.build(copy.deepcopy(mae), 10)
    assert model.param_report() == config.expected_params(mae, 10) and model.param_report().tunable == 38_400
    assert id(model.backbone.fc_norm.weight) in ids(model.tunable_parameters())


def test_ln_tune_trains_exactly_the_layer_norm_affine_tensors():
    model = build("ln_tune")
    norms = [m for m in model.backbone.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * 3 + 1  # tiny_vit: 3 blocks and the final norm
    assert ids(model.tunable_parameters()) == ids(p for m in norms for p in (m.weight, m.bias))
    assert ids(model.trainable_parameters()) == ids(model.tunable_parameters()) | ids(model.head.parameters())
    torch.testing.assert_close(model.merged_backbone()(images()), model.backbone(images()), rtol=0, atol=0)


def test_difffit_trains_biases_norm_weights_and_two_gammas_per_block():
    model = build("difffit")
    vit = model.backbone
    gammas = [m for m in vit.modules() if isinstance(m, BranchScale)]
    assert len(gammas) == 2 * len(vit.blocks)
    assert all(torch.equal(g.gamma, torch.ones(48)) for g in gammas)
    for block in vit.blocks:  # γ scales the output of the last Linear of each branch
        for wrapped in (block.attn.proj, block.mlp.fc2):
            assert isinstance(wrapped, Wrapped) and isinstance(wrapped.after, BranchScale)
            assert isinstance(wrapped.module, nn.Linear)
    biases = [m.bias for m in vit.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.LayerNorm))]
    norm_weights = [m.weight for m in vit.modules() if isinstance(m, nn.LayerNorm)]
    expected = ids(biases) | ids(norm_weights) | ids(g.gamma for g in gammas)
    assert ids(model.tunable_parameters()) == expected
    assert not any(id(m.weight) in expected for m in vit.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def test_difffit_gamma_scales_its_whole_residual_branch():
    model = build("difffit").eval()
    block = model.backbone.blocks[1]
    x = torch.randn(2, 17, 48, generator=torch.Generator().manual_seed(2))
    g_attn, g_mlp = block.attn.proj.after.gamma, block.mlp.fc2.after.gamma
    with torch.no_grad():
        g_mlp.zero_()  # the block is now x + γ₁ ⊙ attention branch
        once = block(x) - x
        g_attn.mul_(2.0)
        torch.testing.assert_close(block(x) - x, 2 * once, rtol=0, atol=1e-6)
        g_attn.zero_()
        torch.testing.assert_close(block(x), x, rtol=0, atol=0)
        g_attn.fill_(1.0)
        g_mlp.fill_(3.0)  # the MLP branch is tripled, the attention branch untouched
        b = block
        y = x + b.attn(b.norm1(x))
        torch.testing.assert_close(block(x), y + 3 * b.mlp.fc2.module(b.mlp.norm(b.mlp.act(b.mlp.fc1(b.norm2(y))))))


def test_difffit_equals_petl_visions_block_in_training_with_drop_path():
    """PETL_Vision: x ← x + γ₁ ⊙ DP(LS₁(attn(LN₁ x))), x ← x + γ₂ ⊙ DP(LS₂(mlp(LN₂ x))), same drop-path masks."""
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0,
                            num_classes=0, drop_path_rate=0.6, init_values=0.5)  # fmt: skip
    plain = copy.deepcopy(vit).train()
    model = get_method("difffit")().build(vit, NUM_CLASSES).train()
    gammas = [torch.rand(48, generator=torch.Generator().manual_seed(i)) + 0.5 for i in range(4)]
    with torch.no_grad():
        for block, g1, g2 in zip(model.backbone.blocks, gammas[::2], gammas[1::2], strict=True):
            block.attn.proj.after.gamma.copy_(g1)
            block.mlp.fc2.after.gamma.copy_(g2)
    x = torch.randn(8, 17, 48, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(5)
    got = model.backbone.blocks(x)
    torch.manual_seed(5)
    expected = x
    for b, g1, g2 in zip(plain.blocks, gammas[::2], gammas[1::2], strict=True):
        expected = expected + g1 * b.drop_path1(b.ls1(b.attn(b.norm1(expected))))
        expected = expected + g2 * b.drop_path2(b.ls2(b.mlp(b.norm2(expected))))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def perturbed(name: str, **options) -> PeftModel:
    model = build(name, **options)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("name", ["ln_tune", "difffit"])
def test_merged_backbone_is_a_plain_vit_with_the_same_logits(name):
    model = perturbed(name)
    x = images()
    expected = model(x)
    merged = model.merged_backbone().eval()
    assert type(merged) is VisionTransformer
    assert not any(type(m).__module__.startswith("methods.") for m in merged.modules())
    assert sum(p.numel() for p in merged.parameters()) == vit_param_count(merged) == model.param_report().backbone
    with torch.no_grad():
        logits = model.forward_head(merged.forward_head(merged.forward_features(x), pre_logits=True))
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)  # the model is left as it was


def test_lora_adapter_refuses_to_merge_in_one_line():
    with pytest.raises(NotMergeableError) as e:
        perturbed("lora_adapter").merged_backbone()
    assert "\n" not in str(e.value)


def test_lora_adapter_sits_after_each_mlp_only_and_adds_its_scaled_bottleneck():
    model = perturbed("lora_adapter", scale=0.5)
    for block in model.backbone.blocks:
        assert type(block.attn).__name__ == "Attention" and isinstance(block.mlp, Wrapped)
        adapter = block.mlp.after
        assert isinstance(adapter, ResidualBottleneck) and adapter.scale == 0.5 and adapter.down.out_features == 8
        assert isinstance(adapter.act, nn.ReLU) and adapter.dropout.p == 0.1
        assert block.mlp.drop_path is not None  # the block's drop-path a second time, before the adapter (training)
    b = model.backbone.blocks[0]
    x = torch.randn(2, 17, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = x + b.attn(b.norm1(x))
        h = b.mlp.module(b.norm2(y))
        a = b.mlp.after
        expected = y + h + 0.5 * a.up(torch.relu(a.down(h)))
        torch.testing.assert_close(b(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("init", ["petl", "lora_xavier", "lora_kaiming"])
def test_lora_adapter_inits(init):
    model = build("lora_adapter", init=init)
    adapters = [m for m in model.tunable_modules() if isinstance(m, ResidualBottleneck)]
    assert len(adapters) == 3
    for a in adapters:
        assert not a.down.bias.any() and not a.up.bias.any()
        if init == "petl":  # the official ViT's re-initialisation: truncated-normal std 0.02 for both weights
            assert 0.01 < a.up.weight.std() < 0.03 and 0.01 < a.down.weight.std() < 0.03
        else:
            assert not a.up.weight.any()
            bound = (6 / (48 + 8)) ** 0.5 if init == "lora_xavier" else (1 / 48) ** 0.5
            assert a.down.weight.abs().max() <= bound and a.down.weight.abs().max() > 0.8 * bound
    config = get_method("lora_adapter")().with_options({"init": init})
    assert config.identity_at_init == (init != "petl")
    reference = get_method("linear")().build(tiny_vit(), NUM_CLASSES)
    reference.head.load_state_dict(model.head.state_dict())
    with torch.no_grad():
        same = torch.allclose(model.eval()(images()), reference.eval()(images()), rtol=0, atol=1e-6)
    assert same == config.identity_at_init


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("ln_tune", {"drop_path_rate": "1.5"}, r"drop_path_rate=1.5 must be in \[0, 1\); set drop_path_rate=0.1"),
        ("ln_tune", {"head_init": "zeros"}, "head_init='zeros' is not one of vpt, torch, trunc_normal"),
        ("difffit", {"drop_path_rate": "-0.1"}, r"drop_path_rate=-0.1 must be in \[0, 1\)"),
        ("difffit", {"decay_all": "maybe"}, "option decay_all takes true or false"),
        ("lora_adapter", {"hidden": "0"}, "hidden=0 must be at least 1; set hidden=8"),
        (
            "lora_adapter",
            {"init": "zero"},
            "init='zero' is not one of petl, lora_xavier, lora_kaiming; set init='lora_xavier'",
        ),
        ("lora_adapter", {"scale": "nan"}, "scale=nan must be a finite number; set scale=0.1"),
        ("lora_adapter", {"dropout": "1"}, r"dropout=1.0 must be in \[0, 1\)"),
    ],
)
def test_bad_options_are_refused_in_one_line(name, options, message):
    with pytest.raises(ValueError, match=message) as e:
        get_method(name)().with_options(options)
    assert "\n" not in str(e.value)


def test_bench_runs_the_three_methods_and_records_their_options(synth_root, tmp_path):
    results = tmp_path / "results"
    options = {"drop_path_rate": "0.2", "head_init": "trunc_normal"}
    sets = [a for k, v in options.items() for a in ("--set", f"{k}={v}")]
    args = argv(f"bench --method {','.join(METHODS)} --tasks camelyon --data-root {synth_root} --results {results}",
                "--epochs", "2", "--batch-size", "32", "--seeds", "42", *sets)  # fmt: skip
    assert main(args) == 0
    test_vit = create_backbone("test_vit", pretrained=False)
    for name in METHODS:
        (record,) = [json.loads(p.read_text()) for p in (results / "runs" / name).rglob("*.json")]
        assert record["status"] == "ok" and record["test_acc"] is not None, record.get("error")
        recorded = record["config"]["method_config"]
        expected = get_method(name)().with_options(options).to_dict()
        assert {k: v for k, v in recorded.items() if k != "recipe"} == {
            k: v for k, v in expected.items() if k != "recipe"
        }
        assert recorded["recipe"]["epochs"] == 2
        config = get_method(name).from_dict(recorded)
        assert record["params"]["tunable"] == config.expected_params(test_vit, 2).tunable
