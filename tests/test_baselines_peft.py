"""LoRA, Adapter, AdaptFormer, BitFit, SSF, FacT and RepAdapter against their notes (docs/methods/), and
merging: every registered method either folds into a plain timm ViT with the same logits or says it cannot."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from benchmark.cli import main
from benchmark.run.backbone import create_backbone
from methods import PeftModel, TunableModule, get_method, list_methods, method_origin, vit_param_count
from methods._base import NotMergeableError
from methods._inject import ParallelLinear, Wrapped
from methods.ssf import SSF_BLOCK_POINTS
from tests.conftest import argv, tiny_vit

# The re-parameterisable methods (spec §8): the table baselines, every `peft` tuner, and trivially the linear
# probe and full fine-tuning.
MERGEABLE = {
    "lora",
    "bitfit",
    "ssf",
    "fact_tt",
    "fact_tk",
    "repadapter",
    "linear",
    "full",
    "peft",
    "ln_tune",
    "difffit",
    "gps",
    "partial_1",
}
MERGEABLE |= {f"peft_{t}" for t in ("lora", "dora", "vera", "ia3", "boft", "oft", "loha", "lokr")}
D = 48  # tiny_vit's width


def build(name: str, seed: int = 0, **options) -> PeftModel:
    config = get_method(name).tiny()
    if options:
        config = config.with_options({k: str(v) for k, v in options.items()})
    torch.manual_seed(seed)
    return config.build(tiny_vit(), 5)


def perturb(model: PeftModel, seed: int = 3, std: float = 0.05) -> PeftModel:
    """Move every tunable tensor away from its init (zero-initialised branches become active)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return model.eval()


def images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# -- merging -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list_methods())
def test_every_method_merges_exactly_or_says_it_cannot(name):
    model = perturb(build(name))
    x = images()
    expected = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        merged = model.merged_backbone()
    except NotMergeableError as e:
        assert name not in MERGEABLE, f"{name} should merge: {e}"
        assert "\n" not in str(e) and str(e)
        return
    # An installed plugin's method (`method_origin`) is not on the list: whether it merges is its own claim.
    assert name in MERGEABLE or method_origin(name), f"{name} merged but is not listed as mergeable"
    assert type(merged) is VisionTransformer
    assert not any(type(m).__module__.startswith("methods.") for m in merged.modules())
    assert sum(p.numel() for p in merged.parameters()) == vit_param_count(merged) == model.param_report().backbone
    merged.eval()
    with torch.no_grad():
        logits = model.forward_head(merged.forward_head(merged.forward_features(x), pre_logits=True))
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    # The model is left as it was.
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("targets", ["qkv", "q,v"])
def test_lora_variants_merge(targets):
    model = perturb(build("lora", targets=targets))
    x = images()
    merged = model.merged_backbone().eval()
    logits = model.forward_head(merged.forward_head(merged.forward_features(x), pre_logits=True))
    torch.testing.assert_close(logits, model(x), rtol=0, atol=1e-5)


# -- LoRA --------------------------------------------------------------------------------------------------
def _qkv_outputs(model: PeftModel, block: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(frozen qkv output, adapted qkv output, qkv input) of `block` on the model's forward of `x`."""
    wrapper = model.backbone.blocks[block].attn.qkv
    assert isinstance(wrapper, ParallelLinear)
    seen = {}
    handle = wrapper.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    with torch.no_grad():
        model(x)
    handle.remove()
    return wrapper.linear(seen["x"]), seen["out"], seen["x"]


def test_lora_delta_is_b_a_x_on_all_of_qkv():
    model = perturb(build("lora"))
    frozen, adapted, inp = _qkv_outputs(model, 1, images())
    branch = model.backbone.blocks[1].attn.qkv.branch
    a, b = branch.a[0], branch.b[0]
    assert a.shape == (8, D) and b.shape == (3 * D, 8) and branch.scale == 1.0
    torch.testing.assert_close(adapted - frozen, inp @ a.T @ b.T, rtol=1e-5, atol=1e-6)
    for s in range(3):  # q, k and v all move
        assert not torch.allclose(adapted[..., s * D : (s + 1) * D], frozen[..., s * D : (s + 1) * D])


def test_lora_qv_leaves_the_k_slice_bit_identical():
    model = perturb(build("lora", targets="q,v", alpha=16))
    frozen, adapted, inp = _qkv_outputs(model, 0, images())
    branch = model.backbone.blocks[0].attn.qkv.branch
    assert branch.scale == 2.0  # alpha / rank
    assert torch.equal(adapted[..., D : 2 * D], frozen[..., D : 2 * D])
    for i, (start, stop) in enumerate([(0, D), (2 * D, 3 * D)]):
        delta = 2.0 * inp @ branch.a[i].T @ branch.b[i].T
        torch.testing.assert_close(adapted[..., start:stop] - frozen[..., start:stop], delta, rtol=1e-5, atol=1e-6)


def test_lora_paper_init_starts_at_zero_with_kaiming_a():
    branch = build("lora", init="paper").backbone.blocks[0].attn.qkv.branch
    assert torch.count_nonzero(branch.b[0]) == 0
    bound = 1 / D**0.5  # kaiming-uniform(a=√5) on fan_in D
    assert branch.a[0].abs().max() <= bound and branch.a[0].std() > bound / 3


# -- SSF ---------------------------------------------------------------------------------------------------
def test_ssf_scales_and_shifts_the_output_of_each_point():
    model = perturb(build("ssf"), std=0.3)
    wrapped = {n.removeprefix("backbone."): m for n, m in model.named_modules() if isinstance(m, Wrapped)}
    blocks = [f"blocks.{i}.{p}" for i in range(3) for p in SSF_BLOCK_POINTS]
    assert list(wrapped) == ["patch_embed.proj", *blocks, "norm"]
    assert SSF_BLOCK_POINTS == ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
    # fc1's SSF acts before the activation: the Mlp calls fc1 (the wrapper), then act.
    assert list(dict(model.backbone.blocks[0].mlp.named_children()))[:2] == ["fc1", "act"]
    seen = {}
    hooks = [w.register_forward_hook(lambda m, args, out, n=n: seen.__setitem__(n, (args[0], out)))
             for n, w in wrapped.items()]  # fmt: skip
    with torch.no_grad():
        model(images())
    for h in hooks:
        h.remove()
    for name, (inp, out) in seen.items():
        ssf = wrapped[name].after
        inner = wrapped[name].module(inp)
        view = (-1, 1, 1) if inner.dim() == 4 else (-1,)
        torch.testing.assert_close(out, inner * ssf.scale.view(view) + ssf.shift.view(view), rtol=0, atol=1e-6)


def test_ssf_init_is_near_identity():
    ssf = [m for m in build("ssf").modules() if isinstance(m, TunableModule)]
    scale = torch.cat([m.scale for m in ssf])
    shift = torch.cat([m.shift for m in ssf])
    assert abs(scale.mean() - 1) < 0.01 and abs(scale.std() - 0.02) < 0.005
    assert abs(shift.mean()) < 0.01 and abs(shift.std() - 0.02) < 0.005


# -- FacT --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["fact_tt", "fact_tk"])
def test_fact_factorised_update_equals_its_dense_reconstruction(name):
    model = perturb(build(name, scale=3.0))
    branches = [m for m in model.modules() if isinstance(m, ParallelLinear)]
    assert len(branches) == 4 * 3  # qkv, proj, fc1, fc2 in every block
    for wrapper in branches:
        x = torch.randn(2, 5, wrapper.linear.in_features)
        delta = wrapper.branch.delta_weight()
        assert delta.shape == wrapper.linear.weight.shape
        torch.testing.assert_close(wrapper.branch(x), x @ delta.T, rtol=1e-5, atol=1e-6)
    # Spec formulas, written independently: ΔW_q = s·V Σ_q U (TT), Σ_j = C ×₃ P[:, j] (TK).
    f = model.fact
    u, v = f.u.weight, f.v.weight
    if name == "fact_tt":
        sigma_q = f.sigma[1]["q"].weight
        sigma_fc2 = f.sigma[1]["fc2"].weight  # [r, 2r] on tiny_vit (MLP ratio 2)
    else:
        cores = torch.einsum("abc,cj->abj", f.core, f.factor)  # [r, r, 3 blocks × 8 slots]
        sigma_q = cores[:, :, 8].T  # block 1, slot 0, in z ↦ z Σ form
        sigma_fc2 = cores[:, :, 8 + 6 : 8 + 8].reshape(4, 8)  # the official reshape of the fc2 slots
    dq = model.backbone.blocks[1].attn.qkv.branch.delta_weight()[:D]
    torch.testing.assert_close(dq, 3.0 * v @ sigma_q @ u, rtol=1e-5, atol=1e-6)
    dfc2 = model.backbone.blocks[1].mlp.fc2.branch.delta_weight()
    expected = torch.cat([3.0 * v @ sigma_fc2[:, g * 4 : (g + 1) * 4] @ u for g in range(2)], dim=1)
    torch.testing.assert_close(dfc2, expected, rtol=1e-5, atol=1e-6)


def test_fact_counts_and_per_task_settings():
    vit_b = create_backbone("vit_base_patch16_224", pretrained=False, device="meta")
    for rank, tt, tk in ((4, 8_448, None), (8, 21_504, None), (16, 61_440, 30_976), (32, 196_608, 86_528)):
        assert get_method("fact_tt")(rank=rank).expected_params(vit_b, 2).tunable == tt
        if tk is not None:
            assert get_method("fact_tk")(rank=rank).expected_params(vit_b, 2).tunable == tk
    assert (get_method("fact_tt")().for_task("svhn").rank, get_method("fact_tt")().for_task("svhn").scale) == (16, 100)
    assert get_method("fact_tk")().for_task("dtd").scale == 0.01
    assert get_method("fact_tk")(per_task=False).for_task("dtd").rank == 16


# -- RepAdapter --------------------------------------------------------------------------------------------
def test_repadapter_is_block_diagonal_and_its_merge_equals_the_unmerged_forward():
    model = perturb(build("repadapter", scale=5.0))
    adapters = [m for m in model.modules() if isinstance(m, TunableModule)]
    assert len(adapters) == 2 * 3
    b = adapters[0].dense_up()  # [D, h] = [48, 8], g = 2: [24, 4] blocks
    assert b.shape == (D, 8)
    assert torch.count_nonzero(b[:24, 4:]) == 0 and torch.count_nonzero(b[24:, :4]) == 0
    assert torch.count_nonzero(b[:24, :4]) == 24 * 4 and torch.count_nonzero(b[24:, 4:]) == 24 * 4
    # Placement: before qkv and fc1, i.e. on the LayerNorm outputs.
    block = model.backbone.blocks[0]
    assert isinstance(block.attn.qkv, Wrapped) and isinstance(block.mlp.fc1, Wrapped)
    z = torch.randn(2, 5, D)
    m, shift = block.attn.qkv.before.input_affine()
    torch.testing.assert_close(block.attn.qkv.before(z), z @ m.T + shift, rtol=1e-5, atol=1e-6)
    merged = model.merged_backbone().eval()
    x = images()
    logits = model.forward_head(merged.forward_head(merged.forward_features(x), pre_logits=True))
    torch.testing.assert_close(logits, model(x), rtol=0, atol=1e-5)


def test_repadapter_sparsity_term():
    model = perturb(build("repadapter", sparse_lambda=1))
    norms = [m.up.weight.norm() for m in model.modules() if isinstance(m, TunableModule)]
    torch.testing.assert_close(model.regularization(), torch.stack(norms).sum())
    assert build("repadapter").regularization() is None  # default 0: cross-entropy alone, as the official main branch


# -- adapters ----------------------------------------------------------------------------------------------
def test_noah_adapter_follows_the_mlp_and_its_drop_path_and_is_not_identity():
    model = build("adapter").eval()
    block = model.backbone.blocks[0]
    adapter = block.drop_path2.after
    x = torch.randn(2, 17, D)
    with torch.no_grad():
        mid = x + block.attn(block.norm1(x))
        h = block.mlp(block.norm2(mid))
        expected = mid + h + adapter.up(adapter.act(adapter.down(h)))
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-6)
    assert type(adapter.act).__name__ == "QuickGELU" and torch.count_nonzero(adapter.up.weight) > 0
    reference = get_method("linear")().build(tiny_vit(), 5).eval()
    reference.head.load_state_dict(model.head.state_dict())
    assert not torch.allclose(model(images()), reference(images()))


def test_houlsby_adapter_follows_each_sub_block_before_its_drop_path():
    model = perturb(build("adapter_houlsby", scale=0.5))
    block = model.backbone.blocks[2]
    a1, a2 = block.attn.after, block.mlp.after
    x = torch.randn(2, 17, D)

    def adapt(a, h):
        return h + 0.5 * a.up(torch.relu(a.down(h)))

    with torch.no_grad():
        mid = x + adapt(a1, block.attn.module(block.norm1(x)))
        expected = mid + adapt(a2, block.mlp.module(block.norm2(mid)))
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-6)


def test_adaptformer_reads_the_residual_stream_beside_the_mlp():
    model = perturb(build("adaptformer"))
    wrapper = model.backbone.blocks[1]
    block, branch = wrapper.block, wrapper.mlp_branch
    x = torch.randn(2, 17, D)
    with torch.no_grad():
        mid = x + block.attn(block.norm1(x))
        expected = mid + block.mlp(block.norm2(mid)) + 0.1 * branch.up(torch.relu(branch.down(mid)))
        torch.testing.assert_close(wrapper(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "options", "tunable"),
    [("lora", {"targets": "q,v"}, 294_912), ("adaptformer", {"hidden": "64"}, 1_189_632),
     ("adapter_houlsby", {}, 313_536), ("repadapter", {"placement": "attn"}, 119_904)],
)  # fmt: skip
def test_option_counts_on_vit_b16(name, options, tunable):
    config = get_method(name)().with_options(options)
    backbone = create_backbone("vit_base_patch16_224", pretrained=False, device="meta")
    assert config.build(copy.deepcopy(backbone), 10).param_report().tunable == tunable
    assert config.expected_params(backbone, 10).tunable == tunable


# -- bad options: one line, exit 2, nothing written --------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "option", "message"),
    [
        ("lora", "targets=k", r"targets='k' is not one of qkv, q,v; set targets='qkv'"),
        ("lora", "rank=0", "rank=0 must be at least 1; set rank=8"),
        ("lora", "alpha=-1", r"alpha=-1.0 must be in \(0, inf\)"),
        ("lora", "rank=65", "rank 65 exceeds the width 64"),
        ("adapter", "activation=tanh", "activation='tanh' is not one of"),
        ("adapter_houlsby", "hidden=0", "hidden=0 must be at least 1"),
        ("adaptformer", "dropout=1", r"dropout=1.0 must be in \[0, 1\)"),
        ("bitfit", "head_init=zeros", "head_init='zeros' is not one of vpt, torch, trunc_normal"),
        ("ssf", "init_std=-1", r"init_std=-1.0 must be in \[0, inf\)"),
        ("fact_tt", "rank=100", "rank 100 exceeds the width 64"),
        ("fact_tk", "rank=x", "takes a int"),
        ("repadapter", "groups=3", "groups=3 does not divide hidden 8; set groups=2"),
        ("repadapter", "hidden=5", "groups=2 does not divide hidden 5"),
        ("repadapter", "placement=mlp", "placement='mlp' is not one of block, attn"),
    ],
)
def test_bad_options_one_line_exit_2(method, option, message, synth_root, tmp_path, capsys):
    results = tmp_path / "r"
    code = main(argv(f"bench --method {method} --tasks camelyon --data-root {synth_root} --results {results}",
                     "--epochs", "1", "--set", option))  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    import re

    assert re.search(message, err), err
    assert not results.exists()


def test_structural_check_against_the_backbone(synth_root, tmp_path, capsys):
    """groups = 24 divides hidden = 24 (the config is valid) but not test_vit's width 64: `check_backbone`."""
    code = main(argv(f"bench --method repadapter --tasks camelyon --data-root {synth_root} --results {tmp_path}/r",
                     "--epochs", "1", "--set", "hidden=24", "--set", "groups=24"))  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.splitlines() == ["error: repadapter on camelyon: groups (24) must divide the width 64"]
    assert not (tmp_path / "r").exists()


NEW = ("lora", "adapter", "adapter_houlsby", "adaptformer", "bitfit", "ssf", "fact_tt", "fact_tk", "repadapter")


def test_each_baseline_trains_through_bench(synth_root, tmp_path):
    import json

    for method in NEW:
        results = tmp_path / method
        assert main(argv(f"bench --method {method} --tasks camelyon --data-root {synth_root} --results {results}",
                         "--epochs", "1", "--batch-size", "16", "--seeds", "42")) == 0  # fmt: skip
        (record,) = [json.loads(p.read_text()) for p in (results / "runs").rglob("*.json")]
        assert record["status"] == "ok", record.get("error")
        config = get_method(method).from_dict(record["config"]["method_config"])
        assert (
            record["params"]["tunable"]
            == config.expected_params(create_backbone("test_vit", pretrained=False), 2).tunable
        )
