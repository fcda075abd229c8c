"""Fidelity to the official code where it is easy to get wrong silently: prompt dropout per sample (drawn as
the official code draws it), E²VPT's key-value prompt dropout, PGN's shortcut initialisation."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from benchmark.cli import main
from methods import get_method, list_methods
from methods._inject import KVExtendedAttention, embed
from methods.e2vpt import E2VPTConfig
from methods.pgn import PGNConfig
from methods.vpt import VPTDeepConfig, VPTShallowConfig
from tests.conftest import argv, tiny_vit

C = 5


def twin_batch(seed: int = 1) -> torch.Tensor:
    """One image twice: a batch of two identical samples."""
    return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).expand(2, -1, -1, -1)


def build(config, seed: int = 0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    return config.build(tiny_vit(), C).to(dtype).train()


# -- 1. prompt dropout: a mask per sample -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cls", "options"),
    [
        (VPTDeepConfig, {"num_tokens": 3, "dropout": 0.5}),
        (VPTShallowConfig, {"num_tokens": 3, "dropout": 0.5}),
        (E2VPTConfig, {"num_tokens": 3, "num_kv_tokens": 2, "dropout": 0.5}),
    ],
    ids=["vpt_deep", "vpt_shallow", "e2vpt"],
)
def test_prompt_dropout_draws_a_mask_per_sample(cls, options):
    model = build(cls(per_task=False, **options))
    torch.manual_seed(3)
    logits = model(twin_batch())
    assert not torch.allclose(logits[0], logits[1])  # the same image, two different dropout masks
    model.eval()
    logits = model(twin_batch())
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)  # no dropout in evaluation


def test_dropped_tokens_keep_per_sample_dropout():
    """E²VPT's `drop` mode after pruning: the surviving prompt tokens still get a dropout mask per sample."""
    config = E2VPTConfig(num_tokens=4, num_kv_tokens=0, dropout=0.5, pruned_tokens="drop", per_task=False)
    model = build(config)
    model.apply_pruning({"masks.token": torch.tensor([1.0, 0.0, 1.0, 1.0]), "masks.segment": torch.ones(4, 16)})
    seen = {}
    model.backbone.blocks[1].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    logits = model.train()(twin_batch())
    assert seen["x"].shape[1] == 1 + 3 + 16  # CLS, the 3 kept prompt tokens, the patches
    assert not torch.allclose(logits[0], logits[1])


def official_order_logits(model, x: torch.Tensor, *, kv_dropout: float = 0.0) -> torch.Tensor:
    """The official prompted forward (deep prompts), step by step: before each block its prompt is expanded to
    [B, P, D] and dropout is applied to that tensor, then E²VPT's masks multiply it; in a block with key-value
    prompts, dropout at rate `kv_dropout` (0: inert, as in the official runs) on the batch-expanded prompt, keys
    first, then values. The random draws come in the official order."""
    vit, prompts, p = model.backbone, model.prompts.prompts, model.prompts.dropout.p
    masks = getattr(model, "masks", None)
    B, n = x.shape[0], prompts.shape[1]
    tokens = embed(vit, x)
    for i, block in enumerate(vit.blocks):
        prompt = F.dropout(prompts[i].expand(B, -1, -1), p, training=True)
        if masks is not None:
            prompt = prompt * masks.expanded()
        tokens = torch.cat([tokens[:, :1], prompt, tokens[:, 1 if i == 0 else 1 + n :]], dim=1)
        if not isinstance(block.attn, KVExtendedAttention):
            tokens = block(tokens)
            continue
        a, e = block.attn.attn, block.attn.extra.key  # the wrapped timm attention, the shared key-value prompt
        q, k, v = a.qkv(block.norm1(tokens)).reshape(B, -1, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        k = torch.cat([F.dropout(e.expand(B, -1, -1, -1), kv_dropout, training=True), k], dim=2)
        v = torch.cat([F.dropout(e.expand(B, -1, -1, -1), kv_dropout, training=True), v], dim=2)
        attn = torch.softmax(q @ k.transpose(-2, -1) * a.scale, dim=-1) @ v
        tokens = tokens + a.proj(attn.transpose(1, 2).reshape(B, tokens.shape[1], -1))
        tokens = tokens + block.mlp(block.norm2(tokens))
    return model.head(vit.norm(tokens)[:, 0])


@pytest.mark.parametrize(
    ("cls", "options", "kv_dropout"),
    [
        (VPTDeepConfig, {"num_tokens": 3, "dropout": 0.3}, 0.0),
        (E2VPTConfig, {"num_tokens": 4, "num_kv_tokens": 0, "dropout": 0.3}, 0.0),
        (E2VPTConfig, {"num_tokens": 4, "num_kv_tokens": 2, "dropout": 0.3, "kv_dropout": 0.5}, 0.0),
        (
            E2VPTConfig,
            {"num_tokens": 3, "num_kv_tokens": 2, "dropout": 0.2, "kv_dropout": 0.4, "kv_dropout_acts": True},
            0.4,
        ),
    ],
    ids=["vpt_deep", "e2vpt", "e2vpt_kv_dropout_inert", "e2vpt_kv_dropout_acts"],
)
def test_training_forward_draws_the_official_random_stream(cls, options, kv_dropout):
    """Training mode, float64: the same seed gives the official code's masks, so the logits agree to rounding."""
    model = build(cls(per_task=False, **options), dtype=torch.float64)
    if hasattr(model, "masks"):  # soft masks as in the dense stage, away from 1
        with torch.no_grad():
            model.masks.token.uniform_(0.5, 1.5)
            model.masks.segment.uniform_(0.5, 1.5)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(7)
    ours = model(x)
    torch.manual_seed(7)
    reference = official_order_logits(model, x, kv_dropout=kv_dropout)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)


# -- 2. E²VPT's key-value prompt dropout -----------------------------------------------------------------------
def test_e2vpt_kv_dropout_never_acts_by_default():
    """The official module sits in the encoder its `train()` keeps in eval mode: whatever the rate, it never acts."""
    config = E2VPTConfig(num_tokens=2, num_kv_tokens=3, dropout=0.0, kv_dropout=0.5, per_task=False)
    model = build(config)
    x = twin_batch()
    first, second = model(x), model(x)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first[0], first[1], rtol=0, atol=0)
    assert config.kv_dropout_acts is False and E2VPTConfig().kv_dropout == 0.0


def test_e2vpt_kv_dropout_option_draws_separate_masks_per_sample_for_keys_and_values():
    config = E2VPTConfig(num_tokens=2, num_kv_tokens=3, dropout=0.0, kv_dropout=0.5, kv_dropout_acts=True,
                         per_task=False)  # fmt: skip
    model = build(config)
    logits = model(twin_batch())
    assert not torch.allclose(logits[0], logits[1])
    kv = model.backbone.blocks[0].attn.extra  # share_kv: one tensor is both the key and the value prompt
    torch.manual_seed(0)
    keys, values = kv(2)
    assert keys.shape == values.shape == (2, *kv.key.shape)
    kept_k, kept_v = keys != 0, values != 0
    assert not torch.equal(kept_k[0], kept_k[1]) and not torch.equal(kept_k, kept_v)
    torch.testing.assert_close(keys[kept_k], (kv.key.expand_as(keys) * 2)[kept_k])  # scaled by 1 / keep
    model.eval()
    keys, values = kv(2)
    assert keys is kv.key and values is kv.key  # evaluation: no dropout, the shared tensor itself


# -- 3. PGN's shortcut convolutions --------------------------------------------------------------------------
def test_pgn_shortcut_biases_keep_pytorch_default_init():
    """The official generator re-initialises conv weights only: a shortcut bias stays U(-1/√fan_in, 1/√fan_in)."""
    torch.manual_seed(0)
    generator = PGNConfig().build(tiny_vit(), C).pgn.generator
    shortcuts = [block.downsample for block in generator.blocks if block.downsample is not None]
    assert [s.in_channels for s in shortcuts] == [16, 32, 64]
    for conv in shortcuts:
        bound = 1 / math.sqrt(conv.in_channels)  # kernel 1×1: fan_in is the input channels
        assert conv.bias.abs().max() <= bound and conv.bias.abs().max() > 0.5 * bound
        assert conv.bias.abs().min() > 0  # drawn, not zeroed
        fan_out_std = math.sqrt(2 / conv.out_channels)  # the weights: kaiming-normal, fan_out, as before
        assert 0.7 * fan_out_std < conv.weight.std() < 1.3 * fan_out_std


# -- 10. options that make a module impossible are refused up front ------------------------------------------
TRIALS = {int: ("-1", "0", "1", "5"), float: ("-0.5", "0", "1", "nan", "inf"), str: ("bogus",)}


def option_trials() -> list[tuple[str, str]]:
    """(method, field) for every numeric and choice field of every registered method."""
    out = []
    for name in list_methods():
        hints = typing.get_type_hints(get_method(name))
        for f in dataclasses.fields(get_method(name)):
            if f.name != "recipe" and any(t in TRIALS for t in typing.get_args(hints[f.name]) or (hints[f.name],)):
                out.append((name, f.name))
    return out


# Settings that fit the one-block micro ViT, under which each option is tried.
MICRO = {"noah": {"depths": "1"}, "spt_lora": {"budget": "0.001"}, "spt_adapter": {"budget": "0.001"}}


def micro_vit() -> VisionTransformer:
    """One block on 16-px images (a 2×2 patch grid): the smallest ViT every method attaches to."""
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=8, embed_dim=48, depth=1, num_heads=3, mlp_ratio=1.0,
                             num_classes=0)  # fmt: skip


def train_step(config, model) -> None:
    """One training step's forward and backward (and, for pruning methods, the pruning decision and a rewound
    model's forward): what a run does with the method's options."""
    x, y = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1])
    loss = F.cross_entropy(model.train()(x), y)
    reg = model.regularization()
    (loss if reg is None else loss + reg).backward()
    assert torch.isfinite(loss)
    if config.prunes:
        initial = {k: v.clone() for k, v in model.tunable_state_dict().items()}
        candidates = config.prune_candidates(model, initial, [(x, y)])
        tunable = model.param_report().tunable
        # no level beyond the model (methods that select rather than prune may not report a count)
        assert all(0 <= c.info.get("nonzero_tunable", tunable) <= tunable for c in candidates)
        rewound = config.build(micro_vit(), C)
        rewound.apply_pruning(candidates[-1].state)
        assert torch.isfinite(rewound(x)).all()


@pytest.mark.parametrize(("method", "option"), option_trials())
def test_every_option_is_refused_up_front_or_trains(method, option):
    """Each tried value of each numeric or choice option is refused when the config is made or checked against
    the backbone (a one-line ValueError naming the option), or builds a model that trains: never a failure later."""
    hint = typing.get_type_hints(get_method(method))[option]
    texts = next(TRIALS[t] for t in typing.get_args(hint) or (hint,) if t in TRIALS)
    for text in texts:
        try:
            config = get_method(method).tiny().with_options({**MICRO.get(method, {}), option: text})
            config.check_backbone(micro_vit())
        except ValueError as e:
            assert option in str(e) and "\n" not in str(e), text
            continue
        torch.manual_seed(0)
        train_step(config, config.build(micro_vit(), C))


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        (
            "e2vpt",
            {"num_segments": "7"},
            "num_segments=7 does not divide the backbone's width 48; set num_segments=16",
        ),
        ("e2vpt", {"num_segments": "0"}, "num_segments=0 must be at least 1; set num_segments=16"),
        (
            "e2vpt",
            {"num_tokens": "3", "min_kept_tokens": "4"},
            "min_kept_tokens=4 must be at most num_tokens=3; set min_kept_tokens=3",
        ),
        (
            "e2vpt",
            {"min_kept_segments": "17"},
            "min_kept_segments=17 must be at most num_segments=16; set min_kept_segments=16",
        ),
        ("e2vpt", {"dropout": "nan"}, "dropout=nan must be a finite number; set dropout=0.1"),
        ("e2vpt", {"kv_dropout": "1"}, "kv_dropout=1.0 must be in [0, 1); set kv_dropout=0.0"),
        ("vpt_deep", {"num_tokens": "0"}, "num_tokens=0 must be at least 1; set num_tokens=10"),
        (
            "vpt_shallow",
            {"head_init": "zeros"},
            "head_init='zeros' is not one of vpt, torch, trunc_normal; set head_init='vpt'",
        ),
        ("convpass", {"hidden": "0"}, "hidden=0 must be at least 1; set hidden=8"),
        ("convpass_attn", {"drop_path_rate": "1"}, "drop_path_rate=1.0 must be in [0, 1); set drop_path_rate=0.1"),
        ("pgn", {"num_prompts": "-2"}, "num_prompts=-2 must be at least 1; set num_prompts=16"),
        (
            "pgn",
            {"generator_resolution": "0"},
            "generator_resolution=0 must be at least 1; set generator_resolution=None",
        ),
        ("lion", {"in_groups": "0"}, "in_groups=0 must be at least 1; set in_groups=4"),
        ("lion", {"in_groups": "3"}, "in_groups=3 does not divide in_channels 8; set in_groups=4"),
        ("lion", {"out_dim": "0"}, "out_dim=0 must be at least 1; set out_dim=64"),
        ("lion", {"tol": "0"}, "tol=0.0 must be in (0, inf); set tol=0.0001"),
        (
            "linear",
            {"head_init": "kaiming"},
            "head_init='kaiming' is not one of vpt, torch, trunc_normal; set head_init='vpt'",
        ),
    ],
)
def test_impossible_options_say_what_to_set(method, options, message):
    with pytest.raises(ValueError) as info:
        get_method(method)().with_options(options).check_backbone(tiny_vit())
    assert message in str(info.value)


def test_configs_refuse_fields_of_the_wrong_type():
    """Configs read back from JSON are checked too: a string where a number belongs is one line, not a crash."""
    with pytest.raises(ValueError, match=r"num_tokens='10' must be int; set num_tokens=10"):
        get_method("vpt_deep").from_dict({"num_tokens": "10"})
    with pytest.raises(ValueError, match=r"prune=1 must be bool; set prune=True"):
        get_method("e2vpt").from_dict({"prune": 1})
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        get_method("linear")().with_recipe(momentum=1.0)


def test_pgn_input_space_needs_an_affine_patch_embedding():
    backbone = tiny_vit()
    backbone.patch_embed.norm = torch.nn.LayerNorm(48)
    with pytest.raises(ValueError, match="input_space=True needs an affine patch embedding"):
        PGNConfig(input_space=True).build(backbone, C)


@pytest.mark.parametrize(
    ("command", "option", "message"),
    [
        ("bench --method e2vpt", "num_segments=7", "e2vpt on camelyon: num_segments=7 does not divide the backbone"),
        ("bench --method lion", "in_groups=0", "lion on camelyon: in_groups=0 must be at least 1; set in_groups=4"),
        ("bench --method convpass", "hidden=0", "convpass on camelyon: hidden=0 must be at least 1; set hidden=8"),
        ("run --method e2vpt --task camelyon", "num_segments=7", "e2vpt on camelyon: num_segments=7 does not divide"),
    ],
)
def test_cli_refuses_impossible_options_before_any_run(command, option, message, synth_root, tmp_path, capsys):
    results = tmp_path / "results"
    extra = ["--tasks", "camelyon"] if command.startswith("bench") else []
    code = main(argv(f"{command} --data-root {synth_root} --results {results}", *extra, "--set", option))
    err = capsys.readouterr().err
    assert code == 2 and message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not results.exists()
