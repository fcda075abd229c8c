"""VPT and E²VPT against their specs: token flow, inits, the KV attention, masks, levels, importance."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from benchmark.cli import main
from benchmark.run.backbone import create_backbone
from methods._inject import KVExtendedAttention
from methods.e2vpt import (
    E2VPT_TOKENS,
    E2VPTConfig,
    importance_scores,
    nested_masks,
    segment_levels,
    token_levels,
)
from methods.vpt import VPT_DEEP_TOKENS, VPTDeepConfig, VPTShallowConfig, prompt_init_bound
from tasks import TASKS
from tests.conftest import argv, tiny_vit

C = 5


def images(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def build(config, seed: int = 0):
    torch.manual_seed(seed)
    return config.build(tiny_vit(), C).eval()


def perturb_prompt_outputs(model, block: int, p: int):
    """Add noise to the prompt positions of `block`'s output; returns the hook handle."""

    def hook(module, args, output):
        noisy = output.clone()
        noisy[:, 1 : 1 + p] += 10 * torch.randn_like(noisy[:, 1 : 1 + p])
        return noisy

    return model.backbone.blocks[block].register_forward_hook(hook)


@pytest.mark.parametrize("config", [VPTDeepConfig(num_tokens=3), E2VPTConfig(num_tokens=3, num_kv_tokens=2)])
@pytest.mark.parametrize("block", [0, 1, 2])
def test_deep_prompt_outputs_are_replaced_not_carried(config, block):
    model = build(config)
    expected = model(images())
    handle = perturb_prompt_outputs(model, block, 3)
    torch.testing.assert_close(model(images()), expected, rtol=0, atol=0)
    handle.remove()


def test_shallow_prompts_flow_through_every_block():
    model = build(VPTShallowConfig(num_tokens=3))
    expected = model(images())
    handle = perturb_prompt_outputs(model, 0, 3)
    assert not torch.allclose(model(images()), expected)
    handle.remove()


@pytest.mark.parametrize("config", [VPTDeepConfig(num_tokens=3), VPTShallowConfig(num_tokens=3)])
def test_prompts_sit_after_cls_without_position_embedding(config):
    model = build(config)
    seen = {}
    handle = model.backbone.blocks[0].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    x = images()
    model(x)
    handle.remove()
    tokens = seen["x"]
    vit = model.backbone
    assert tokens.shape[1] == 1 + 3 + vit.patch_embed.num_patches
    torch.testing.assert_close(tokens[:, 1:4], model.prompts.prompts[0].expand(3, -1, -1))
    plain = vit._pos_embed(vit.patch_embed(x))
    torch.testing.assert_close(tokens[:, :1], plain[:, :1])  # CLS (with its position embedding) stays first
    torch.testing.assert_close(tokens[:, 4:], plain[:, 1:])


def test_init_bound_equals_the_formula():
    with torch.device("meta"):
        vit_b = create_backbone("vit_base_patch16_224", pretrained=False, device="meta")
    assert prompt_init_bound(vit_b) == 0.0625  # sqrt(6 / (3·16·16 + 768))
    bound = math.sqrt(6 / (3 * 8 * 8 + 48))
    for config in (VPTDeepConfig(num_tokens=50), VPTShallowConfig(num_tokens=50), E2VPTConfig(num_tokens=50)):
        prompts = build(config).prompts.prompts
        assert prompts.abs().max() <= bound and prompts.abs().max() > 0.95 * bound
        assert abs(prompts.mean()) < 0.01
    kv = build(E2VPTConfig(num_tokens=2, num_kv_tokens=4)).backbone.blocks[0].attn.extra.key  # [3, 4, 16]
    kv_bound = math.sqrt(6 / (4 * 16))  # kaiming-uniform, fan_in = N_kv·head_dim
    assert kv.abs().max() <= kv_bound and kv.abs().max() > 0.8 * kv_bound


def test_prompt_dropout_only_in_training():
    model = build(VPTDeepConfig(num_tokens=3, dropout=0.5))
    assert model.prompts.dropout.p == 0.5 and VPTShallowConfig().dropout == 0.0 and VPTDeepConfig().dropout == 0.1
    torch.testing.assert_close(model(images()), model(images()), rtol=0, atol=0)
    model.train()
    assert not torch.allclose(model(images()), model(images()))


def test_kv_extended_attention_equals_explicit_softmax_and_leaves_qkv_alone():
    vit = tiny_vit()
    attn = vit.blocks[0].attn
    qkv_before = {k: v.clone() for k, v in attn.qkv.state_dict().items()}
    keys, values = torch.randn(3, 4, 16), torch.randn(3, 4, 16)

    class Extra(torch.nn.Module):
        def forward(self, batch):
            return keys, values

    wrapped = KVExtendedAttention(attn, Extra()).eval()
    x = torch.randn(2, 7, 48)
    out = wrapped(x)
    q, k, v = attn.qkv(x).reshape(2, 7, 3, 3, 16).permute(2, 0, 3, 1, 4)
    k = torch.cat([keys.expand(2, -1, -1, -1), k], dim=2)
    v = torch.cat([values.expand(2, -1, -1, -1), v], dim=2)
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(16), dim=-1)  # [2, heads, 7, 4 + 7]
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 7, 48))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert out.shape == x.shape  # queries are not extended
    out.sum().backward()
    assert all(torch.equal(v, qkv_before[k]) for k, v in attn.qkv.state_dict().items())


def test_e2vpt_with_unit_masks_and_no_kv_prompts_equals_vpt_deep():
    e2vpt = build(E2VPTConfig(num_tokens=3, num_kv_tokens=0), seed=0)
    vpt = build(VPTDeepConfig(num_tokens=3), seed=1)
    vpt.prompts.load_state_dict(e2vpt.prompts.state_dict())
    vpt.head.load_state_dict(e2vpt.head.state_dict())
    torch.testing.assert_close(e2vpt(images()), vpt(images()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["strided", "contiguous"])
def test_segment_layout(layout):
    model = build(E2VPTConfig(num_tokens=2, num_kv_tokens=1, segment_layout=layout))
    with torch.no_grad():
        model.masks.segment[1, 5] = 0.0
    mask = model.masks.expanded()
    zero = (mask[1] == 0).nonzero().flatten().tolist()
    expected = list(range(5, 48, 16)) if layout == "strided" else list(range(5 * 3, 6 * 3))
    assert zero == expected and bool((mask[0] == 1).all())


def test_level_sequences_equal_the_spec():
    assert token_levels(10) == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert token_levels(5) == [0, 1, 2, 3, 4]
    assert token_levels(32) == [3, 6, 9, 12, 16, 19, 22, 25, 28]
    assert token_levels(1) == [0]
    assert segment_levels(16) == [1, 3, 4, 6, 8, 9, 11, 12]
    assert E2VPTConfig(num_tokens=10).levels() == (token_levels(10), segment_levels(16))
    small = E2VPTConfig(num_tokens=10, max_token_levels=3, max_segment_levels=2).levels()
    assert small == ([1, 5, 9], [1, 12])


def test_nested_masks_prune_the_lowest_scores_first():
    token_scores = torch.tensor([0.3, -0.2, 0.1, -0.5])
    segment_scores = torch.tensor([[3.0, 1.0, 2.0, 0.0]] * 4)
    token, segment = nested_masks(token_scores, segment_scores, n_tok=2, n_seg=1)
    assert token.tolist() == [1, 0, 1, 0]  # -0.5 and -0.2 go first
    assert segment[:, 3].eq(0).all() and segment[:, :3].eq(1).all()  # the same count in every token
    _, segment = nested_masks(token_scores, segment_scores, n_tok=0, n_seg=3)
    assert segment[0].tolist() == [1, 0, 0, 0]


def test_importance_sign_convention_and_no_side_effects():
    model = build(E2VPTConfig(num_tokens=3, num_kv_tokens=1)).train()
    with torch.no_grad():
        model.masks.token.copy_(torch.tensor([1.0, 0.5, 2.0]))
    batches = [(images(4, seed=s), torch.arange(4) % C) for s in (1, 2)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = {mode: importance_scores(model, batches, mode) for mode in ("signed", "abs", "taylor")}
    assert model.training  # mode restored
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    # Reference: gradients of the eval-mode loss, averaged over batches.
    model.eval()
    grads = []
    for x, y in batches:
        grads.append(torch.autograd.grad(F.cross_entropy(model(x), y), [model.masks.token])[0])
    mean_signed = torch.stack(grads).mean(0)
    torch.testing.assert_close(scores["signed"][0], mean_signed)
    torch.testing.assert_close(scores["abs"][0], torch.stack(grads).abs().mean(0))
    torch.testing.assert_close(scores["taylor"][0], -model.masks.token.detach() * mean_signed)
    assert scores["signed"][1].shape == (3, 16)


def test_pruning_zeroes_or_drops_tokens_and_counts_survivors():
    config = E2VPTConfig(num_tokens=4, num_kv_tokens=2)
    token, segment = nested_masks(torch.tensor([0.0, -1.0, 1.0, 2.0]), torch.zeros(4, 16), n_tok=1, n_seg=3)
    for mode, length in (("zero", 1 + 4 + 16), ("drop", 1 + 3 + 16)):
        model = build(E2VPTConfig(num_tokens=4, num_kv_tokens=2, pruned_tokens=mode))
        assert model.masks.token.requires_grad and model.param_report().nonzero_tunable == model.param_report().tunable
        model.apply_pruning({"masks.token": token, "masks.segment": segment})
        assert not model.masks.token.requires_grad and model.auxiliary_parameters() == []
        lengths = []
        for block in model.backbone.blocks:
            block.register_forward_pre_hook(lambda m, args, seen=lengths: seen.append(args[0].shape[1]))
        model(images())
        assert set(lengths) == {length}
        if mode == "zero":
            assert model.layer_prompt(2, 1)[1].abs().sum() == 0  # the pruned token is a zero vector at every layer
        report = model.param_report()
        assert report.tunable == 6 * 64 * 0 + 3 * 48 * (4 + 2)
        assert (
            report.nonzero_tunable
            == config.pruned_nonzero(tiny_vit(), 1, 3)
            == 3 * 3 * (4 - 1) * (16 - 3) + 3 * 48 * 2
        )


def test_masks_train_in_the_dense_stage_but_are_not_tunable():
    model = build(E2VPTConfig(num_tokens=3, num_kv_tokens=1)).train()
    trainable = {id(p) for p in model.trainable_parameters()}
    assert id(model.masks.token) in trainable and id(model.masks.segment) in trainable
    assert all(id(p) != id(model.masks.token) for p in model.tunable_parameters())
    assert {"masks.token", "masks.segment"} <= model.tunable_state_dict().keys()


def test_vit_b16_pruned_counts_from_the_spec():
    backbone = create_backbone("vit_base_patch16_224", pretrained=False, device="meta")
    config = E2VPTConfig(num_tokens=10, num_kv_tokens=5)
    kv = 9_216 * 5
    assert config.pruned_nonzero(backbone, 1, 1) == 77_760 + kv
    assert config.pruned_nonzero(backbone, 5, 8) == 23_040 + kv
    assert config.pruned_nonzero(backbone, 9, 12) == 2_304 + kv


def test_params_on_vit_b16_per_task(capsys):
    assert (
        main(["params", "--backbone", "vit_base_patch16_224", "--methods", "vpt_deep,vpt_shallow,e2vpt", "--json"])
        == 0
    )
    rows = {(r["method"], r["task"]): r for r in json.loads(capsys.readouterr().out)}
    for task in TASKS:
        p = VPT_DEEP_TOKENS[task.id]
        assert rows[("vpt_deep", task.id)]["tunable"] == 9_216 * p
        assert rows[("vpt_shallow", task.id)]["tunable"] == 768 * p
        P, n_kv = E2VPT_TOKENS[task.id]
        assert rows[("e2vpt", task.id)]["tunable"] == rows[("e2vpt", task.id)]["nonzero_tunable"] == 9_216 * (P + n_kv)
        assert all(rows[(m, task.id)]["head"] == 769 * task.num_classes for m in ("vpt_deep", "e2vpt"))
    assert rows[("e2vpt", "caltech101")]["tunable"] == 340_992 and rows[("e2vpt", "camelyon")]["tunable"] == 184_320


def test_per_task_defaults():
    assert VPTDeepConfig().for_task("dmlab").num_tokens == 100
    sun = VPTDeepConfig().for_task("sun397")
    assert sun.num_tokens == 5 and sun.recipe.batch_size == 128 and sun.recipe.lr == 25 * 128 / 256
    assert VPTDeepConfig(per_task=False).for_task("dmlab").num_tokens == 10
    e = E2VPTConfig().for_task("caltech101")
    assert (e.num_tokens, e.num_kv_tokens) == (32, 5)
    assert copy.deepcopy(e) == e


@pytest.mark.slow
def test_e2vpt_pipeline_end_to_end(synth_root, tmp_path):
    results = tmp_path / "results"
    args = argv(f"bench --method e2vpt --tasks camelyon --data-root {synth_root} --results {results}",
                "--epochs", "3", "--batch-size", "32", "--seeds", "42,44",
                "--set", "max_token_levels=2", "--set", "max_segment_levels=2")  # fmt: skip
    assert main(args) == 0
    task_dir = results / "runs/e2vpt/camelyon"
    stage = task_dir / "final-prune"
    assert {p.name for p in stage.iterdir() if p.suffix != ".logs"} == {  # each run's curves in <stem>.logs
        "dense.json", "dense.safetensors", "dense-init.safetensors",
        "rewind-tok1-seg1.json", "rewind-tok1-seg12.json", "rewind-tok9-seg1.json", "rewind-tok9-seg12.json",
    }  # fmt: skip
    decided = {p.name for p in (task_dir / "decisions").iterdir()}
    assert decided == {"final-prune-candidates.safetensors", "final-prune-choice.json"}
    rewinds = {p.stem[7:]: json.loads(p.read_text()) for p in stage.glob("rewind-*.json")}
    assert all(r["mode"] == "tune" and r["val_acc"] is not None and r["seed"] == 43 for r in rewinds.values())
    finals = sorted(task_dir.glob("final-s*.json"))
    assert [p.name for p in finals] == ["final-s42.json", "final-s44.json"]
    for path in finals:
        r = json.loads(path.read_text())
        assert r["status"] == "ok" and r["test_acc"] is not None
        pruning = r["pruning"]
        best = max(rewinds.items(), key=lambda kv: (kv[1]["val_acc"], kv[1]["pruning"]["masked_tokens"],
                                                    kv[1]["pruning"]["masked_segments"]))  # fmt: skip
        assert pruning["candidate"] == best[0]
        n_tok, n_seg = pruning["masked_tokens"], pruning["masked_segments"]
        assert len(pruning["pruned_token_ids"]) == n_tok and len(pruning["search"]) == 4
        # camelyon: P = 10, N_kv = 10 on test_vit (6 blocks, width 64, 16 segments of 4 dims)
        assert r["params"]["tunable"] == 6 * 64 * 20
        assert (
            r["params"]["nonzero_tunable"]
            == pruning["nonzero_tunable"]
            == 6 * 4 * (10 - n_tok) * (16 - n_seg) + 6 * 64 * 10
        )
        assert r["config"]["method_config"]["max_token_levels"] == 2
    assert "e2vpt" in (results / "leaderboard.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["vpt_deep", "vpt_shallow"])
def test_vpt_bench_on_two_tasks(method, synth_root, tmp_path):
    results = tmp_path / "results"
    assert main(argv(f"bench --method {method} --tasks camelyon,svhn --data-root {synth_root} --results {results}",
                     "--epochs", "3", "--batch-size", "32", "--seeds", "42", "--set", "num_tokens=4")) == 0  # fmt: skip
    records = [json.loads(p.read_text()) for p in sorted((results / "runs").rglob("*.json"))]
    assert [r["status"] for r in records] == ["ok", "ok"]
    layers = 6 if method == "vpt_deep" else 1
    assert all(r["params"]["tunable"] == layers * 4 * 64 for r in records)  # --set wins over the per-task length


def test_set_rejects_unknown_or_badly_typed_options(synth_root, tmp_path, capsys):
    for option, message in (("bogus=1", "e2vpt has no option 'bogus'"), ("num_tokens=x", "takes a int"),
                            ("prune=maybe", "takes true or false")):  # fmt: skip
        code = main(argv(f"bench --method e2vpt --tasks camelyon --data-root {synth_root} --results {tmp_path}/r",
                         "--set", option))  # fmt: skip
        assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
