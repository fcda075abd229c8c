"""The `peft` tuners: the spec's §9 counts, formulas equal to what peft builds, merging, options and bad values."""

from __future__ import annotations

import copy
import re
import typing
import warnings

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from benchmark.cli import main
from benchmark.run.backbone import create_backbone
from methods import get_method
from methods._peft_options import peft_config_class
from methods.peft_tuners import TUNERS, PeftTunerConfig, lokr_factorization
from tests.conftest import argv, tiny_vit

# docs/methods/peft_tuners.md on ViT-B/16 (LoRA, DoRA, VeRA, IA³, LoHa), and for BOFT, OFT and LoKr the count
# of the formula derived from peft's parameter shapes (`PeftTunerConfig.tunable_count`).
VIT_B16 = {
    "peft_lora": 294_912,  # 12 · 3072 · 8
    "peft_dora": 322_560,  # + 12 · 2304 magnitudes
    "peft_vera": 30_720,  # 12 · (256 + 2304)
    "peft_ia3": 64_512,  # 12 · (2304 + 3072)
    "peft_loha": 589_824,  # 12 · 2 · 8 · (768 + 2304)
    "peft_boft": 64_512,  # 12 · (768 · 4 + 2304)
    "peft_oft": 142_848,  # 12 · 24 blocks · 32·31/2
    "peft_lokr": 21_504,  # 12 · (48·24 + 8·(48 + 32)): 768 = 24·32, 2304 = 48·48, w2 low-rank
}


@pytest.fixture(scope="module")
def vit_b16() -> VisionTransformer:
    return create_backbone("vit_base_patch16_224", pretrained=False, device="meta")


@pytest.mark.parametrize("name", sorted(VIT_B16))
def test_spec_counts_on_vit_b16(name, vit_b16):
    config = get_method(name)()
    model = config.build(copy.deepcopy(vit_b16), 10)
    assert model.param_report().tunable == VIT_B16[name] == config.tunable_count(vit_b16)
    assert model.param_report().backbone == 85_798_656


@pytest.mark.parametrize(
    ("tuner", "options"),
    [
        ("lora", {"r": "4", "target_modules": "qkv,fc1,fc2", "use_rslora": "true"}),
        ("lora", {"use_dora": "true", "target_modules": "proj"}),
        ("dora", {"r": "2", "target_modules": "qkv,fc2"}),
        ("vera", {"r": "16", "target_modules": "qkv,proj"}),
        ("ia3", {"target_modules": "qkv,fc1,fc2", "feedforward_modules": "fc1,fc2"}),
        ("boft", {"boft_block_size": "0", "boft_block_num": "6", "target_modules": "qkv,fc1"}),
        ("boft", {"boft_block_size": "8", "target_modules": "fc2"}),
        ("oft", {"oft_block_size": "8", "target_modules": "qkv,fc2"}),
        ("oft", {"oft_block_size": "16", "block_share": "true"}),
        ("oft", {"oft_block_size": "0", "r": "4"}),
        ("loha", {"r": "3", "target_modules": "fc1"}),
        ("lokr", {"r": "2"}),
        ("lokr", {"r": "1", "decompose_both": "true", "target_modules": "qkv,fc1"}),
        ("lokr", {"r": "8", "decompose_factor": "4", "target_modules": "qkv,fc2"}),
    ],
)
def test_formula_equals_what_peft_builds(tuner, options):
    config = get_method("peft")().with_options({"tuner": tuner, **options})
    backbone = tiny_vit()
    model = config.build(copy.deepcopy(backbone), 5)
    assert model.param_report() == config.expected_params(backbone, 5)
    assert model.param_report().tunable > 0


def test_lokr_factorization_matches_peft():
    from peft.tuners.lokr.layer import factorization

    for dim in (48, 96, 144, 768, 2304, 3072, 127, 1000):
        for factor in (-1, 2, 4, 5, 16, 64):
            assert lokr_factorization(dim, factor) == factorization(dim, factor), (dim, factor)


def test_lora_delta_is_b_a_x_on_the_qkv_output():
    config = get_method("peft_lora")().with_options({"dropout": "0"})
    model = config.build(tiny_vit(), 5).eval()
    layer = model.backbone.blocks[0].attn.qkv
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(2, 17, 48)
    base = layer.get_base_layer()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(layer(x), base(x) + x @ a.T @ b.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(VIT_B16))
def test_merged_backbone_is_a_plain_vit_with_equal_logits(name):
    from peft.tuners.tuners_utils import BaseTunerLayer

    backbone = tiny_vit()
    model = get_method(name).tiny().build(copy.deepcopy(backbone), 5)
    with torch.no_grad():  # a trained state: every adapter tensor away from its (identity) initialisation
        for p in model.tunable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        merged = model.merged_backbone().eval()
        logits = model.head(merged.forward_head(merged.forward_features(x), pre_logits=True))
    assert type(merged) is VisionTransformer and not hasattr(merged, "peft_config")
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in backbone.parameters())
    assert merged.state_dict().keys() == backbone.state_dict().keys()
    assert (logits - expected).abs().max() < 1e-5
    assert any(isinstance(m, BaseTunerLayer) for m in model.modules()), "merging left the model unchanged"
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(VIT_B16))
def test_a_build_and_a_training_step_warn_nothing(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = get_method(name).tiny().build(tiny_vit(), 5)
        torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1])).backward()


def test_checkpoint_holds_only_adapters_and_head():
    model = get_method("peft_lora")().build(tiny_vit(), 5)
    state = model.tunable_state_dict()
    assert sum(v.numel() for v in state.values()) == model.param_report().tunable + model.param_report().head
    assert {k.split(".")[-3] for k in state if k.startswith("backbone.")} == {"lora_A", "lora_B"}
    vera = get_method("peft_vera")().build(tiny_vit(), 5)  # save_projection: one copy of the shared projections
    keys = [k for k in vera.tunable_state_dict() if ".vera_A." in k or ".vera_B." in k]
    assert len(keys) == 2


def test_scaling_vectors_are_not_weight_decayed():
    model = get_method("peft_dora")().build(tiny_vit(), 5)
    no_decay = {id(p) for p in model.no_weight_decay_parameters()}
    layer = model.backbone.blocks[0].attn.qkv
    assert id(layer.lora_magnitude_vector["default"].weight) in no_decay
    assert id(layer.lora_A["default"].weight) not in no_decay


def test_options_map_onto_each_tuners_config():
    lora = get_method("peft")().with_options({"r": "4", "alpha": "16", "dropout": "0.2", "use_rslora": "1"})
    c = lora.peft_config()
    assert (c.r, c.lora_alpha, c.lora_dropout, c.use_rslora, sorted(c.target_modules)) == (4, 16, 0.2, True, ["qkv"])
    boft = get_method("peft")().with_options({"tuner": "boft", "boft_block_size": "8", "dropout": "0"})
    assert (boft.peft_config().boft_block_size, boft.peft_config().boft_dropout) == (8, 0.0)
    assert get_method("peft_dora")().peft_config().use_dora
    assert list(TUNERS) == ["lora", "dora", "vera", "ia3", "boft", "oft", "loha", "lokr"]


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("peft", {"tuner": "adalora"}, r"tuner='adalora' is not one of lora, dora"),
        ("peft", {"r": "two"}, r"option r takes a int, got 'two'"),
        ("peft", {"r": "0"}, r"r=0 must be at least 1; set r=8"),
        ("peft", {"dropout": "1.5"}, r"dropout=1.5 must be in \[0, 1\); set dropout=0.1"),
        ("peft", {"tuner": "ia3", "r": "4"}, r"ia3 has no r; its options: tuner, target_modules, feedforward"),
        ("peft", {"bias": "all"}, r"peft \(lora\) has no option 'bias'; options: tuner, r, alpha"),
        ("peft", {"use_rslora": "maybe"}, r"option use_rslora takes true or false"),
        ("peft", {"init_lora_weights": "pissa"}, r"init_lora_weights takes true, false, gaussian"),
        ("peft", {"target_modules": ","}, r"target_modules is empty"),
        ("peft_boft", {"boft_n_butterfly_factor": "2"}, r"boft_n_butterfly_factor must be 1"),
        ("peft_boft", {"boft_block_num": "4"}, r"peft refuses this boft config: .*boft_block_size.*boft_block_num"),
        ("peft_vera", {"tuner": "lora"}, r"peft_vera is peft's vera; for another tuner use --method peft"),
        ("peft_ia3", {"feedforward_modules": "proj"}, r"peft refuses this ia3 config"),
    ],
)
def test_bad_values_are_refused_in_one_line(method, options, message):
    with pytest.raises(ValueError, match=message) as info:
        get_method(method)().with_options(options)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"target_modules": "query"}, r"target_modules 'query' names no Linear of the backbone; its block Linears"),
        ({"tuner": "boft", "boft_block_size": "5"}, r"boft block size 5 does not divide blocks.0.attn.qkv's 48"),
        ({"tuner": "oft", "oft_block_size": "32"}, r"oft block size 32 does not divide"),
    ],
)
def test_configs_that_do_not_fit_the_backbone_are_refused_before_building(options, message):
    with pytest.raises(ValueError, match=message):
        get_method("peft")().with_options(options).build(tiny_vit(), 5)


def test_bad_set_value_on_the_command_line_exits_2(synth_root, tmp_path, capsys):
    code = main(argv(f"run --method peft --task camelyon --data-root {synth_root} --results {tmp_path}",
                     "--set", "tuner=boft", "--set", "boft_block_size=5", "--epochs", "1"))  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "does not divide" in err, err
    assert not list(tmp_path.rglob("*.json"))


def test_bench_refuses_a_nan_initial_value_before_anything_runs(synth_root, tmp_path, capsys):
    code = main(argv(f"bench --method peft_vera --tasks camelyon --seeds 42 --data-root {synth_root} "
                     f"--results {tmp_path / 'res'}", "--set", "d_initial=nan", "--epochs", "1"))  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "d_initial=nan must be a finite number; set d_initial=0.1" in err
    assert not [p for p in (tmp_path / "res").rglob("*") if p.is_file()]


# Values each tuner's peft config accepted and that failed only later (a NaN loss, an empty adapter, a crash while
# counting or building): every numeric option is checked by its meaning before anything runs.
@pytest.mark.parametrize(
    ("method", "option", "message"),
    [
        ("peft_loha", "rank_dropout=1", r"rank_dropout=1.0 must be in \[0, 1\)"),
        ("peft_loha", "module_dropout=-0.1", r"module_dropout=-0.1 must be in \[0, 1\)"),
        ("peft_lokr", "rank_dropout=nan", r"rank_dropout=nan must be a finite number"),
        ("peft_lokr", "module_dropout=1.5", r"module_dropout=1.5 must be in \[0, 1\)"),
        ("peft_vera", "d_initial=inf", r"d_initial=inf must be a finite number; set d_initial=0.1"),
        ("peft_vera", "d_initial=0", r"d_initial=0.0 must not be 0"),
        ("peft_vera", "projection_prng_key=-5", r"projection_prng_key=-5 must be at least 0"),
        ("peft_oft", "eps=nan", r"eps=nan must be a finite number; set eps=6e-05"),
        ("peft_oft", "eps=0", r"eps=0.0 must be in \(0, inf\)"),
        ("peft_oft", "num_cayley_neumann_terms=1", r"num_cayley_neumann_terms=1 must be at least 2"),
        ("peft_oft", "oft_block_size=-16", r"oft_block_size=-16 must be at least 0; set oft_block_size=32"),
        ("peft_boft", "boft_block_size=-4", r"boft_block_size=-4 must be at least 0; set boft_block_size=4"),
        ("peft_lokr", "decompose_factor=0", r"decompose_factor=0 must be -1 \(any factor\) or at least 1"),
        ("peft_lokr", "decompose_factor=-3", r"decompose_factor=-3 must be at least -1"),
        ("peft", "target_modules=", r"target_modules is empty"),
        ("peft_ia3", "feedforward_modules=,", r"feedforward_modules=\[\] names no module"),
    ],
)
def test_bad_peft_values_exit_2_before_anything_runs(method, option, message, synth_root, tmp_path, capsys):
    code = main(argv(f"run --method {method} --task camelyon --data-root {synth_root} --results {tmp_path}",
                     "--set", option, "--epochs", "1"))  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert re.search(message, err), err
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_every_numeric_or_list_option_has_a_meaning():
    from methods._peft_options import MEANINGS

    suite = typing.get_type_hints(PeftTunerConfig)
    for tuner, spec in TUNERS.items():
        hints = typing.get_type_hints(peft_config_class(tuner))
        for name in (*spec.common, *spec.own):
            hint = suite[name] if name in suite else hints[name]
            if not {int, float, list[str]} & {hint, *typing.get_args(hint)}:
                continue
            assert name in MEANINGS, f"{tuner}'s option {name} ({hint}) has no meaning to check it by"
