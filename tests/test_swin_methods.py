"""Every registered method on timm's Swin (except the prompt methods, tested with their own code): it either
works there, with its parameter formula, training and merging checked, or refuses in one line."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.models.swin_transformer import SwinTransformer

from benchmark.run.backbone import create_backbone, meta_backbone
from methods import MethodConfig, NotMergeableError, PeftModel, get_method, list_methods

PROMPT_METHODS = {"vpt_shallow", "vpt_deep", "e2vpt"}  # Swin prompts: tests/test_swin_prompts.py
METHODS = [n for n in list_methods() if n not in PROMPT_METHODS]
ON_SWIN = [n for n in METHODS if "swin" in get_method(n).families]
REFUSED = [n for n in METHODS if n not in ON_SWIN]
NUM_CLASSES = 5
TINY = "peft_bench_tiny_swin"
SWIN_B = "swin_base_patch4_window7_224"


def tiny_swin(**kwargs) -> SwinTransformer:
    return create_backbone(TINY, pretrained=False, **kwargs)


def build(name: str, seed: int = 0, **kwargs) -> tuple[MethodConfig, PeftModel]:
    config = get_method(name).tiny()
    backbone = tiny_swin(**kwargs)
    torch.manual_seed(seed)
    return config, config.build(backbone, NUM_CLASSES)


def images(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_the_methods_expected_on_swin_are_there():
    assert {"linear", "full", "lora", "adapter", "adapter_houlsby", "adaptformer", "bitfit", "ssf",
            "repadapter", "peft_lora", "peft_ia3", "lion"} <= set(ON_SWIN)  # fmt: skip
    assert {"convpass", "convpass_attn", "fact_tt", "fact_tk", "pgn"} <= set(REFUSED)


@pytest.mark.parametrize("name", ON_SWIN)
def test_param_report_matches_the_formula_on_swin(name):
    config, model = build(name)
    assert model.param_report() == config.expected_params(tiny_swin(), NUM_CLASSES)
    assert model.param_report().head == (128 + 1) * NUM_CLASSES


@pytest.mark.parametrize("name", ON_SWIN)
def test_a_training_step_changes_only_tunable_parameters_and_head(name):
    _, model = build(name, drop_path_rate=0.1)
    model.train()
    trainable = {id(p) for p in model.trainable_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    torch.nn.functional.cross_entropy(model(images()), torch.arange(3) % NUM_CLASSES).backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    allowed = {n for n, p in model.named_parameters() if id(p) in trainable}
    assert changed <= allowed, sorted(changed - allowed)[:5]
    assert {"head.weight", "head.bias"} <= changed
    tunable = {id(p) for p in model.tunable_parameters()}
    if tunable:
        assert any(id(p) in tunable for n, p in model.named_parameters() if n in changed), f"{name}: no tunable moved"


IDENTITY_VARIANTS = [(n, {}) for n in ON_SWIN] + [
    ("lora", {"init": "paper", "targets": "q,v"}), ("adapter", {"init": "lora"}), ("adapter_houlsby", {"init": "lora"}),
]  # fmt: skip


@pytest.mark.parametrize(("name", "options"), IDENTITY_VARIANTS)
def test_identity_at_init_where_claimed_on_swin(name, options):
    config = get_method(name).tiny().with_options(options)
    if not config.identity_at_init:
        pytest.skip(f"{name} does not claim identity at initialisation")
    backbone = tiny_swin()
    torch.manual_seed(0)
    model = config.build(copy.deepcopy(backbone), NUM_CLASSES).eval()
    reference = get_method("linear")().build(copy.deepcopy(backbone), NUM_CLASSES).eval()
    reference.head.load_state_dict(model.head.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(images()), reference(images()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ON_SWIN)
def test_merged_swin_equals_the_model_or_refuses_in_one_line(name):
    _, model = build(name)
    with torch.no_grad():  # move every tunable tensor off its initial value, so the merge has something to fold
        for p in model.tunable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    try:
        merged = model.merged_backbone()
    except NotMergeableError as e:
        assert "\n" not in str(e)
        assert name not in ("linear", "full", "lora", "bitfit", "repadapter", "peft_lora")
        return
    assert type(merged) is SwinTransformer
    assert sum(p.numel() for p in merged.parameters()) == model.param_report().backbone
    with torch.no_grad():
        x = images()
        expected = model(x)
        got = model.head(merged.eval().forward_head(merged.forward_features(x), pre_logits=True))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_ssf_on_swin_refuses_to_merge_because_the_patch_merging_has_no_bias():
    _, model = build("ssf")
    with pytest.raises(NotMergeableError, match=r"downsample\.reduction.*without bias"):
        model.merged_backbone()


@pytest.mark.parametrize("name", REFUSED)
def test_refusing_methods_say_so_in_one_line(name):
    config = get_method(name).tiny()
    with pytest.raises(ValueError) as info:
        config.build(tiny_swin(), NUM_CLASSES)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{name} cannot attach to a Swin backbone")
    assert config.needs in message and config.needs != MethodConfig.needs


# -- Swin-B counts, by hand ---------------------------------------------------------------------------------
# Swin-B: patch 4, window 7, widths 128·2^s, depths 2, 2, 18, 2, MLP ratio 4.
DIMS, DEPTHS = (128, 256, 512, 1024), (2, 2, 18, 2)
SUM_D = 2 * 128 + 2 * 256 + 18 * 512 + 2 * 1024  # Σ over the 24 blocks of their width: 12,032


def test_swin_b_width_sum():
    assert sum(d * n for d, n in zip(DIMS, DEPTHS, strict=True)) == SUM_D == 12_032


@pytest.mark.parametrize(
    ("name", "options", "tunable"),
    [
        ("linear", {}, 0),
        ("full", {}, 86_743_224),
        # r = 8 on the q and the v slice of each block's qkv: 2 pairs of (d·8 + 8·d)
        ("lora", {"targets": "q,v", "rank": "8"}, 2 * 2 * 8 * SUM_D),  # 385,024
        ("lora", {}, (128 * 4 * 8) * 0 + 4 * 8 * SUM_D),  # NOAH's pair on all of qkv: d·8 + 8·3d
        # every bias: patch embedding conv + LayerNorm (2·128); per block qkv 3d, proj d, fc1 4d, fc2 d,
        # norm1 d, norm2 d (11d); the three patch mergings' LayerNorm(4d); the final LayerNorm(1024)
        ("bitfit", {}, 2 * 128 + 11 * SUM_D + 4 * (128 + 256 + 512) + 1024),  # 137,216
        # scale and shift (×2) after: patch conv and norm (2·128); per block norm1, qkv, proj, norm2, fc1, fc2
        # (d + 3d + d + d + 4d + d = 11d); per merging its LayerNorm(4d) and reduction (2d); the final norm
        ("ssf", {}, 2 * (2 * 128 + 11 * SUM_D + 6 * (128 + 256 + 512) + 1024)),  # 278,016
    ],
)
def test_swin_b_counts_equal_the_closed_forms(name, options, tunable):
    config = get_method(name)().with_options(options)
    report = config.expected_params(meta_backbone(SWIN_B), 10)
    assert report.tunable == tunable
    assert report.head == 1025 * 10
    assert report.backbone == 86_743_224
    assert {"bitfit": 137_216, "ssf": 278_016}.get(name, tunable) == tunable
    if name == "lora" and options:
        assert tunable == 385_024


@pytest.mark.parametrize("name", ["lora", "bitfit", "ssf", "linear", "full", "adapter", "repadapter"])
def test_swin_b_built_on_the_meta_device_counts_as_its_formula(name):
    config = get_method(name)()
    backbone = create_backbone(SWIN_B, pretrained=False, device="meta")
    with torch.device("meta"):
        model = config.create(backbone, 10)
    model.mark_trainable()
    assert model.param_report() == config.expected_params(meta_backbone(SWIN_B), 10)


# -- the Swin attachment against plain references, in float64 ----------------------------------------------
def _randomise(model: PeftModel) -> None:
    with torch.no_grad():
        for p in model.tunable_parameters():
            p.copy_(0.2 * torch.randn_like(p))


def test_adaptformer_on_swin_adds_its_branch_on_the_stream_after_attention():
    torch.manual_seed(0)
    backbone = tiny_swin().double().eval()
    reference = copy.deepcopy(backbone)
    config = get_method("adaptformer")()
    model = config.build(backbone, NUM_CLASSES).double().eval()
    _randomise(model)
    x = torch.randn(2, 8, 8, 32, dtype=torch.float64)  # the input of stage 1's blocks
    wrapped, plain = model.backbone.layers[1].blocks[1], reference.layers[1].blocks[1]
    branch = wrapped.mlp_branch
    with torch.no_grad():
        mid = x + plain._attn(plain.norm1(x))  # the stream entering the MLP sub-block
        expected = plain(x) + config.scale * branch.up(torch.relu(branch.down(mid)))
        torch.testing.assert_close(wrapped(x), expected, rtol=0, atol=1e-12)


def test_houlsby_adapters_on_swin_follow_each_sub_block():
    torch.manual_seed(0)
    backbone = tiny_swin().double().eval()
    reference = copy.deepcopy(backbone)
    model = get_method("adapter_houlsby")().build(backbone, NUM_CLASSES).double().eval()
    _randomise(model)
    block, plain = model.backbone.layers[0].blocks[1], reference.layers[0].blocks[1]  # a shifted-window block
    attn_adapter, mlp_adapter = block.drop_path1.before[-1], block.mlp.after

    def adapter(a, h):
        return h + a.up(torch.relu(a.down(h)))

    x = torch.randn(2, 16, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        y = x + adapter(attn_adapter, plain._attn(plain.norm1(x)))
        y = y + adapter(mlp_adapter, plain.mlp(plain.norm2(y)))
        torch.testing.assert_close(block(x), y, rtol=0, atol=1e-12)


def test_export_merges_a_swin_lora_with_its_head():
    from benchmark.run.export import merged_model

    _, model = build("lora")
    _randomise(model)
    model.eval()
    merged = merged_model(model, NUM_CLASSES, "lora").eval()
    assert type(merged) is SwinTransformer
    with torch.no_grad():
        torch.testing.assert_close(merged(images()), model(images()), rtol=1e-4, atol=1e-4)
