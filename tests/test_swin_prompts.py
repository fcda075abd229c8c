"""VPT and E²VPT on timm's Swin against the official semantics (docs/backbones.md, Swin-B).

The reference below is written from the spec alone, in float64, with explicit loops: windows are visited one by
one, the shift is an index map, patch merging concatenates the four neighbours by hand, the relative-position bias
is read from the table with an index computed here, and attention is an explicit softmax. It reads the model's
parameters only.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from benchmark.cli import main
from benchmark.run.backbone import create_backbone, meta_backbone
from methods.e2vpt import E2VPTConfig
from methods.vpt import VPTDeepConfig, VPTShallowConfig
from tests.conftest import tiny_vit

C = 5
SWIN_B = "swin_base_patch4_window7_224"


# -- the plain reference -------------------------------------------------------------------------------------------
def ln(x, norm):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def lin(x, layer):
    y = x @ layer.weight.T
    return y if layer.bias is None else y + layer.bias


def mlp(x, m):
    return lin(F.gelu(lin(x, m.fc1)), m.fc2)


def bias_table(attn):
    """[heads, area, area]: entry (a, b) reads row (dy + wh − 1)·(2·ww − 1) + (dx + ww − 1) of the table."""
    wh, ww = attn.window_size
    area = wh * ww
    out = torch.zeros(attn.num_heads, area, area, dtype=torch.float64)
    for a in range(area):
        for b in range(area):
            dy, dx = a // ww - b // ww, a % ww - b % ww
            out[:, a, b] = attn.relative_position_bias_table[(dy + wh - 1) * (2 * ww - 1) + (dx + ww - 1)]
    return out


def region(pos, size, window, shift):
    """The Swin shift-mask region of a coordinate of the shifted map (3 bands when shifted)."""
    return 0 if pos < size - window else (1 if pos < size - shift else 2)


def window_attention(attn, tokens, p, bias, mask, kv):
    """tokens [p + area, C]: prompts first. bias/mask [area, area] for the patches; prompts and kv get 0."""
    heads = attn.num_heads
    n = tokens.shape[0]
    qkv = lin(tokens, attn.qkv).view(n, 3, heads, -1)
    out = []
    for h in range(heads):
        q, k, v = qkv[:, 0, h], qkv[:, 1, h], qkv[:, 2, h]
        extra = torch.zeros(n, n, dtype=torch.float64)
        extra[p:, p:] = bias[h] + mask
        if kv is not None:
            k = torch.cat([kv[h], k])
            v = torch.cat([kv[h], v])
            extra = torch.cat([torch.zeros(n, kv.shape[1], dtype=torch.float64), extra], dim=1)
        scores = q @ k.T / math.sqrt(q.shape[-1]) + extra
        weights = torch.exp(scores - scores.max(-1, keepdim=True).values)
        out.append((weights / weights.sum(-1, keepdim=True)) @ v)
    return lin(torch.cat(out, dim=-1), attn.proj)


def block_ref(blk, x, prompts, kv, order):
    B, H, W, _ = x.shape
    p = prompts.shape[1]
    y, z = ln(x, blk.norm1), ln(prompts, blk.norm1)
    (wh, ww), (sh, sw) = blk.window_size, blk.shift_size
    rows_from, cols_from = (torch.arange(H) + sh) % H, (torch.arange(W) + sw) % W  # shifted (r, c) reads these
    shifted = y[:, rows_from][:, :, cols_from]
    bias = bias_table(blk.attn)
    attn_out = torch.zeros_like(x)
    acc, count = torch.zeros_like(prompts), [0] * B
    n_wr, n_wc = H // wh, W // ww
    for b in range(B):
        for wr in range(n_wr):
            for wc in range(n_wc):
                i = b * n_wr * n_wc + wr * n_wc + wc  # windows are numbered image by image
                src = i % B if order == "official" else b  # the official code pairs window i with image i mod B
                rows, cols = range(wr * wh, (wr + 1) * wh), range(wc * ww, (wc + 1) * ww)
                cells = [(r, c) for r in rows for c in cols]
                patches = torch.stack([shifted[b, r, c] for r, c in cells])
                ids = torch.tensor([3 * region(r, H, wh, sh) + region(c, W, ww, sw) for r, c in cells])
                mask = torch.where(ids[:, None] == ids[None, :], 0.0, -100.0).double()  # all 0 when unshifted
                out = window_attention(blk.attn, torch.cat([z[src], patches]), p, bias, mask, kv)
                acc[src] += out[:p]
                count[src] += 1
                for j, (r, c) in enumerate(cells):  # un-shift: shifted (r, c) is map ((r + sh) % H, (c + sw) % W)
                    attn_out[b, (r + sh) % H, (c + sw) % W] = out[p + j]
    x = x + attn_out
    prompts = prompts + acc / torch.tensor(count, dtype=torch.float64).view(B, 1, 1)
    return x + mlp(ln(x, blk.norm2), blk.mlp), prompts + mlp(ln(prompts, blk.norm2), blk.mlp)


def merge_ref(merge, x, prompts):
    _, H, W, _ = x.shape
    out = torch.stack([
        torch.stack([torch.cat([x[:, 2 * r, 2 * c], x[:, 2 * r + 1, 2 * c], x[:, 2 * r, 2 * c + 1],
                                x[:, 2 * r + 1, 2 * c + 1]], -1) for c in range(W // 2)], 1)
        for r in range(H // 2)
    ], 1)  # fmt: skip
    prompts = torch.cat([prompts] * 4, -1)  # four copies of each prompt
    return lin(ln(out, merge.norm), merge.reduction), lin(ln(prompts, merge.norm), merge.reduction)


def reference(model, images, *, deep, pool, order, e2vpt=False):
    swin = model.backbone
    pe = swin.patch_embed
    x = ln(F.conv2d(images, pe.proj.weight, pe.proj.bias, stride=pe.proj.stride).permute(0, 2, 3, 1), pe.norm)
    B = x.shape[0]
    prompts = model.prompts.input.expand(B, -1, -1)
    if e2vpt:  # token mask × segment mask (segment j covers dims j, j + S, ...) on the input prompts only
        S = model.masks.segment.shape[1]
        dims = torch.arange(prompts.shape[-1]) % S
        prompts = prompts * model.masks.token[:, None] * model.masks.segment[:, dims]
    j = 0
    for s, stage in enumerate(swin.layers):
        if s > 0:
            x, prompts = merge_ref(stage.downsample, x, prompts)
        for i, blk in enumerate(stage.blocks):
            if deep and (s, i) != (0, 0):
                prompts = model.prompts.deep[s][i - 1 if s == 0 else i].expand(B, -1, -1)
            kv = model.kv[j].key if e2vpt else None
            x, prompts = block_ref(blk, x, prompts, kv, order)
            j += 1
    x, prompts = ln(x, swin.norm), ln(prompts, swin.norm)
    tokens = x.reshape(B, -1, x.shape[-1])
    feats = torch.cat([prompts, tokens], 1).mean(1) if pool == "all" else tokens.mean(1)
    return lin(feats, model.head)


def tiny_model(config, *, fused=False, seed=0):
    torch.manual_seed(seed)
    swin = create_backbone("peft_bench_tiny_swin", pretrained=False)
    for m in swin.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
    model = config.build(swin, C).double().eval()
    with torch.no_grad():  # large random weights everywhere, so that every path shows in the logits
        for name, t in model.named_parameters():
            t.copy_(torch.randn_like(t) * (1.0 if "masks" in name else 0.3))
    return model


CONFIGS = {
    "vpt_shallow": lambda **kw: VPTShallowConfig(num_tokens=3, **kw),
    "vpt_deep": lambda **kw: VPTDeepConfig(num_tokens=3, **kw),
    "e2vpt": lambda **kw: E2VPTConfig(num_tokens=3, num_kv_tokens=2, **kw),
}


@pytest.mark.parametrize(
    "name,pool,order,fused",
    [("vpt_shallow", "all", "official", False), ("vpt_shallow", "image", "per_sample", True),
     ("vpt_shallow", "all", "official", True), ("vpt_deep", "all", "official", True),
     ("vpt_deep", "image", "official", False), ("e2vpt", "all", "official", False),
     ("e2vpt", "all", "official", True), ("e2vpt", "image", "per_sample", False)],
)  # fmt: skip
def test_logits_match_the_plain_reference(name, pool, order, fused):
    model = tiny_model(CONFIGS[name](pool=pool, window_order=order), fused=fused)
    assert any(any(b.shift_size) for s in model.backbone.layers for b in s.blocks)  # shifted windows exercised
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(images)
        want = reference(model, images, deep=name != "vpt_shallow", pool=pool, order=order, e2vpt=name == "e2vpt")
    assert want.abs().max() > 0.1
    assert (got - want).abs().max() < 1e-10


def test_window_order_official_mixes_images_per_sample_does_not():
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for order, independent in (("official", False), ("per_sample", True)):
        model = tiny_model(VPTShallowConfig(num_tokens=3, window_order=order))
        with torch.no_grad():
            together, alone = model(images)[:1], model(images[:1])
        assert torch.allclose(together, alone, atol=1e-12, rtol=0) == independent
    # one image per batch: both orders are the same computation
    a, b = (tiny_model(VPTShallowConfig(num_tokens=3, window_order=o)) for o in ("official", "per_sample"))
    with torch.no_grad():
        assert (a(images[:1]) - b(images[:1])).abs().max() < 1e-12


# -- parameter counts -------------------------------------------------------------------------------------------
def test_swin_b_counts_on_meta():
    swin = meta_backbone(SWIN_B)
    for config, tunable in [
        (VPTDeepConfig(num_tokens=10), 120_320), (VPTShallowConfig(num_tokens=10), 1_280),
        (E2VPTConfig(num_tokens=10, num_kv_tokens=5), 12_032 * 15), (E2VPTConfig(num_tokens=1, num_kv_tokens=1), 24_064),
    ]:  # fmt: skip
        model = config.build(swin, 10)
        report = model.param_report()
        assert report.tunable == tunable == config.expected_params(swin, 10).tunable
        assert report.head == 1025 * 10 and report.backbone == 86_743_224
    e2 = E2VPTConfig(num_tokens=10, num_kv_tokens=5)
    assert e2.pruned_nonzero(swin, 0, 0) == 12_032 * 15
    # 8 of 16 segments (8 dims each) of 7 of 10 input prompts survive; the deep and KV prompts are not masked
    assert e2.pruned_nonzero(swin, 3, 8) == 7 * 8 * 8 + 12_032 * 10 - 1_280 + 12_032 * 5


def test_params_command_prints_120320_for_every_task(capsys):
    args = ["params", "--backbone", SWIN_B, "--method", "vpt_deep", "--set", "num_tokens=10", "--tasks", "eurosat,dtd"]
    assert main([*args, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["task"] for r in rows} == {"eurosat", "dtd"}
    assert all(r["tunable"] == 120_320 for r in rows)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tiny_swin_counts_equal_the_formula(name):
    config = CONFIGS[name]()
    model = tiny_model(config)
    assert model.param_report() == config.expected_params(model.backbone, C)
    dims, depths = [16, 32, 64, 128], [2, 2, 2, 2]
    per_token = sum(d * n for d, n in zip(dims, depths, strict=True))  # 480
    assert model.param_report().tunable == {"vpt_shallow": 3 * 16, "vpt_deep": 3 * per_token,
                                            "e2vpt": 5 * per_token}[name]  # fmt: skip


# -- training --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_training_step_changes_only_prompts_and_head(name):
    model = tiny_model(CONFIGS[name]()).float()
    model.train()
    assert model.training and not any(m.training for m in model.backbone.modules())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {id(p) for p in model.trainable_parameters()}
    named = dict(model.named_parameters())
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    loss = F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1]))
    loss.backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(("prompts.", "head.", "kv.", "masks.")) for k in changed)
    assert all(not p.requires_grad for k, p in named.items() if k.startswith("backbone."))
    assert all(id(named[k]) in trainable for k in changed)


# -- bad input -------------------------------------------------------------------------------------------------------
def test_bad_pool_and_unshared_kv_on_swin_are_one_line_errors():
    for make in (lambda: VPTDeepConfig(pool="cls"), lambda: E2VPTConfig(pool="mean"),
                 lambda: VPTShallowConfig(window_order="batch")):  # fmt: skip
        with pytest.raises(ValueError) as e:
            make()
        assert "\n" not in str(e.value) and "set " in str(e.value)
    swin = create_backbone("peft_bench_tiny_swin", pretrained=False)
    with pytest.raises(ValueError, match="share_kv") as e:
        E2VPTConfig(num_tokens=3, num_kv_tokens=2, share_kv=False).build(swin, C)
    assert "\n" not in str(e.value) and "Swin" in str(e.value)


# -- the `pool` option on ViT ------------------------------------------------------------------------------------
def test_vit_pool_all_averages_prompts_where_the_backbone_averages():
    images = torch.randn(2, 3, 32, 32)
    for global_pool, equal in (("token", True), ("avg", False)):
        logits = {}
        for pool in ("all", "image"):
            vit = tiny_vit()
            vit.reset_classifier(0, global_pool=global_pool)
            torch.manual_seed(3)
            logits[pool] = VPTDeepConfig(num_tokens=2, pool=pool).build(vit, C).eval()(images)
        assert torch.allclose(logits["all"], logits["image"], atol=1e-6) == equal


def test_e2vpt_pruning_on_swin_masks_the_input_prompts_only():
    config = E2VPTConfig(num_tokens=4, num_kv_tokens=2, max_token_levels=2, max_segment_levels=2)
    model = tiny_model(config).float()
    initial = {k: v.clone() for k, v in model.tunable_state_dict().items()}
    batches = [(torch.randn(2, 3, 32, 32), torch.tensor([0, 3]))]
    candidates = config.prune_candidates(model, initial, batches)
    assert len(candidates) == 4
    for cand in candidates:
        fresh = tiny_model(config).float()
        fresh.apply_pruning(cand.state)
        assert fresh.nonzero_tunable() == cand.info["nonzero_tunable"]
        assert not fresh.masks.token.requires_grad and fresh.auxiliary_parameters() == []
        n_tok, n_seg = cand.info["masked_tokens"], cand.info["masked_segments"]
        # 16-wide stage 0, 16 segments of one dim: (4 − n_tok)·(16 − n_seg) input entries survive
        assert cand.info["nonzero_tunable"] == (4 - n_tok) * (16 - n_seg) + 4 * 480 - 4 * 16 + 2 * 480
        with torch.no_grad():
            assert torch.isfinite(fresh(torch.randn(1, 3, 32, 32))).all()
