"""SPT-LoRA and SPT-Adapter against the official code's rules: sensitivity, allotment, counts, the decision stage."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import torch.nn.functional as F

from benchmark.cli import main
from benchmark.run.backbone import create_backbone
from methods._sparse import SparseDelta
from methods._spt_allot import candidate_pieces, module_cost, sensitivity
from methods.lora import LoRA
from methods.spt import SPTAdapterConfig, SPTLoRAConfig, decision_params
from tests.conftest import argv, tiny_vit

D, HIDDEN, DEPTH = 48, 96, 3  # tiny_vit


def offset(pieces, path: str, attr: str = "weight", op: str | None = None) -> tuple[int, int]:
    """(global offset, numel) of the piece (path, attr, op)."""
    at = 0
    for p in pieces:
        if p.path == path and p.attr == attr and (op is None or p.op == op):
            return at, p.numel
        at += p.numel
    raise KeyError((path, attr, op))


def test_sensitivity_is_the_summed_squared_gradient():
    torch.manual_seed(0)
    config = SPTLoRAConfig.tiny()
    model = config.build(tiny_vit(), 5)
    x, y = torch.randn(14, 3, 32, 32), torch.randint(0, 5, (14,))
    scores, seen = sensitivity(model, [(x[:8], y[:8]), (x[8:], y[8:])], images=12, chunk=4)
    assert seen == 12

    # By hand: the plain backbone with the same head, the loss of each 4-image chunk, its gradient squared.
    plain, head = tiny_vit(), copy.deepcopy(model.head)
    plain.train()
    total = {n: torch.zeros_like(p) for n, p in plain.named_parameters()}
    for i in range(0, 12, 4):
        plain.zero_grad()
        F.cross_entropy(head(plain.forward_head(plain.forward_features(x[i : i + 4]), pre_logits=True)),
                        y[i : i + 4]).backward()  # fmt: skip
        for n, p in plain.named_parameters():
            total[n] += p.grad**2
    pieces = candidate_pieces(plain)
    per_block = 4 * D * D + 2 * D * HIDDEN + (3 * D + D + HIDDEN + D) + 4 * D
    assert (
        scores.numel() == DEPTH * per_block + 2 * D
    )  # the final norm too; no patch/position embedding or class token
    for block in (0, 2):
        qkv = total[f"blocks.{block}.attn.qkv.weight"]
        for j, op in enumerate(("q", "k", "v")):
            at, n = offset(pieces, f"blocks.{block}.attn.qkv", op=op)
            torch.testing.assert_close(scores[at : at + n], qkv[j * D : (j + 1) * D].flatten(), rtol=1e-5, atol=1e-12)
        at, n = offset(pieces, f"blocks.{block}.mlp.fc2")
        torch.testing.assert_close(scores[at : at + n], total[f"blocks.{block}.mlp.fc2.weight"].flatten())
        at, n = offset(pieces, f"blocks.{block}.norm2", "bias")
        torch.testing.assert_close(scores[at : at + n], total[f"blocks.{block}.norm2.bias"])
    at, n = offset(pieces, "blocks.1.attn.qkv", "bias")  # the q third of the fused bias
    torch.testing.assert_close(scores[at : at + n], total["blocks.1.attn.qkv.bias"][:D])
    # The frozen weights are left frozen, without gradients.
    tuned = {id(p) for p in model.tunable_parameters()}
    assert not any(p.requires_grad for p in model.backbone.parameters() if id(p) not in tuned)
    assert all(p.grad is None for p in model.backbone.parameters())


def hand_map(pieces) -> tuple[torch.Tensor, dict[str, list[int]]]:
    """Small random scores, with high ones on chosen entries."""
    scores = torch.rand(sum(p.numel for p in pieces), generator=torch.Generator().manual_seed(0)) * 1e-3
    at = {
        "q0": offset(pieces, "blocks.0.attn.qkv", op="q")[0],  # 100 entries ≥ 192 / 10: LoRA
        "k2": offset(pieces, "blocks.2.attn.qkv", op="k")[0],  # 19 entries < 19.2: unstructured
        "fc2_2": offset(pieces, "blocks.2.mlp.fc2")[0],  # 5 entries < 28.8: unstructured
        "norm1w0": offset(pieces, "blocks.0.norm1")[0],  # 10 entries ≥ 48 / 5: the whole vector
        "norm2b1": offset(pieces, "blocks.1.norm2", "bias")[0],  # 9 entries < 9.6: unstructured
    }
    counts = {"q0": 100, "k2": 19, "fc2_2": 5, "norm1w0": 10, "norm2b1": 9}
    chosen = {k: [at[k] + 3 * i for i in range(n)] for k, n in counts.items()}
    for idx in chosen.values():
        scores[idx] = 1.0 + torch.rand(len(idx), generator=torch.Generator().manual_seed(1))
    return scores, chosen


def test_allotment_rule_on_a_hand_made_map():
    config = SPTLoRAConfig(budget=1.0, rank=2)
    backbone = tiny_vit()
    pieces, allotter = candidate_pieces(backbone), config.allotter(backbone)
    scores, chosen = hand_map(pieces)
    budget = D + 192 + 19 + 5 + D + 9  # class token, LoRA on q0 (2·(48 + 48)), entries, norm1 of block 0 whole
    decision = allotter.allot(scores, budget)
    matrices = [(p.path, p.op) for p in pieces if p.op]
    assert [matrices[i] for i in decision.structured.nonzero().flatten().tolist()] == [("blocks.0.attn.qkv", "q")]
    whole = list(range(offset(pieces, "blocks.0.norm1")[0], offset(pieces, "blocks.0.norm1")[0] + D))
    expected = sorted(chosen["k2"] + chosen["fc2_2"] + chosen["norm2b1"] + whole)
    assert decision.entries.tolist() == expected
    assert decision.total == budget
    # One parameter less: the budget is respected (something is dropped), never exceeded.
    smaller = allotter.allot(scores, budget - 1)
    assert smaller.total <= budget - 1 and smaller.entries.numel() < decision.entries.numel() + 1
    # The adapter's costs: 2·out·r + r + out (fc1's adapter is as wide as its output).
    fc1 = next(p for p in pieces if p.op == "fc1")
    assert module_cost("adapter", 2, fc1) == 2 * HIDDEN * 2 + 2 + HIDDEN
    assert module_cost("lora", 2, fc1) == 2 * (D + HIDDEN)


def hand_decision(model) -> dict[str, torch.Tensor]:
    pieces = model.pieces
    matrices = [(p.path, p.op) for p in pieces if p.op]
    structured = torch.zeros(len(matrices), dtype=torch.uint8)
    structured[matrices.index(("blocks.0.attn.qkv", "q"))] = 1
    structured[matrices.index(("blocks.1.mlp.fc1", "fc1"))] = 1
    proj, _ = offset(pieces, "blocks.2.attn.proj")
    bias, _ = offset(pieces, "blocks.2.attn.proj", "bias")
    norm, _ = offset(pieces, "blocks.1.norm1", "bias")
    kq, _ = offset(pieces, "blocks.0.attn.qkv", op="k")
    entries = torch.tensor([proj + 5, proj + 70, bias + 1, norm + 2, norm + 40, kq + 7])
    return {"structured": structured, "entries": entries}


@pytest.mark.parametrize("config", [SPTLoRAConfig(budget=0.002, rank=2), SPTAdapterConfig(budget=0.002, rank=2)])
def test_only_selected_entries_and_modules_change_after_a_step(config):
    torch.manual_seed(0)
    model = config.build(tiny_vit(), 5)
    decision = hand_decision(model)
    model.apply_pruning(decision)
    # The count formula: class token + structured costs + entries.
    costs = {"lora": 2 * (D + D) + 2 * (D + HIDDEN), "adapter": (2 * D * 2 + 2 + D) + (2 * HIDDEN * 2 + 2 + HIDDEN)}
    assert (
        model.param_report().tunable
        == D + costs[config.structured] + 6
        == decision_params(config, tiny_vit(), decision)
    )
    tuned = {id(p) for p in model.tunable_parameters()}
    frozen = [(p, p.detach().clone()) for p in model.backbone.parameters() if id(p) not in tuned]
    tunable = [(n, p.detach().clone()) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(2):  # two steps: B (or up) moves first, then A (or down) receives a gradient
        optimizer.zero_grad()
        F.cross_entropy(model(torch.randn(6, 3, 32, 32)), torch.randint(0, 5, (6,))).backward()
        optimizer.step()
    assert all(torch.equal(p, p0) for p, p0 in frozen)  # bit-identical
    changed = {n for n, p0 in tunable if not torch.equal(p0, dict(model.named_parameters())[n])}
    assert changed == {n for n, _ in tunable}  # every tuned tensor moved
    deltas = [m for m in model.modules() if isinstance(m, SparseDelta)]
    assert sorted(m.values.numel() for m in deltas) == [1, 1, 2, 2]  # k of block 0, proj b | proj W, norm1 b
    for module in model.backbone.modules():  # the effective weight differs from the frozen one on the entries only
        for attr, delta in getattr(module, "deltas", {}).items():
            base = getattr(module.module, attr)
            moved = (delta.add_to(base) != base).flatten().nonzero().flatten()
            assert set(moved.tolist()) <= set(delta.index.tolist()) and moved.numel() > 0
    structured = [m for m in model.modules() if isinstance(m, LoRA)] if config.structured == "lora" else []
    assert len(structured) == (2 if config.structured == "lora" else 0)


def test_default_decision_on_vit_b16():
    backbone = create_backbone("vit_base_patch16_224", pretrained=False, device="meta", drop_path_rate=0.1)
    allotter = SPTLoRAConfig().allotter(backbone)
    matrices, vectors = 12 * (4 * 768 * 768 + 2 * 768 * 3072), 12 * (3 * 768 + 768 + 3072 + 768 + 4 * 768) + 2 * 768
    assert int(allotter.sizes.sum()) == matrices + vectors == 85_056_000
    model = SPTLoRAConfig().build(copy.deepcopy(backbone), 10)
    assert model.param_report().tunable == 400_000
    # 768 (class token); LoRA-8 on blocks 0–2 (110,592 each), block 3's q, k, v, proj and block 4's q;
    # the remaining 6,016 as entries of block 3's fc1.
    assert sum(isinstance(m, LoRA) for m in model.modules()) == 3 * 6 + 4 + 1
    assert [m.values.numel() for m in model.modules() if isinstance(m, SparseDelta)] == [6_016]
    # The most SPT-LoRA can tune: every matrix with its LoRA, every vector whole, the class token.
    assert allotter.maximum() == 12 * 110_592 + vectors + 768
    assert SPTAdapterConfig().build(copy.deepcopy(backbone), 10).param_report().tunable == 400_000


@pytest.mark.parametrize(
    "option, message",
    [("budget", "budget=0.0 must be in (0, inf)"), ("rank", "rank=0 must be at least 1"),
     ("alpha", "alpha=0.0 must be in (0, inf)"), ("beta", "beta=0.0 must be in (0, inf)")],
)  # fmt: skip
def test_bad_options_are_refused(option, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SPTLoRAConfig().with_options({option: "0"})


def test_bad_options_stop_the_cli_before_training(synth_root, tmp_path, capsys):
    for option, message in (
        ("budget=2", "budget=2.0 exceeds the 53952 parameters SPT can tune"),
        ("rank=0", "rank=0 must be at least 1"),
    ):
        code = main(argv(f"bench --method spt_lora --tasks camelyon --data-root {synth_root} --results {tmp_path}/r",
                         "--set", option))  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_spt_lora_pipeline_end_to_end(synth_root, tmp_path):
    results = tmp_path / "results"
    args = argv(f"bench --method spt_lora --tasks camelyon --data-root {synth_root} --results {results}",
                "--epochs", "2", "--batch-size", "32", "--seeds", "42", "--set", "budget=0.01", "--set", "rank=2")  # fmt: skip
    assert main(args) == 0
    task_dir = results / "runs/spt_lora/camelyon"
    decided = {p.name for p in (task_dir / "decisions").iterdir()}
    assert decided == {"final-prune-candidates.safetensors", "final-prune-choice.json"}
    assert not (task_dir / "final-prune").exists() or not any((task_dir / "final-prune").glob("dense*"))
    (final,) = sorted(task_dir.glob("final-s*.json"))
    r = json.loads(final.read_text())
    assert r["status"] == "ok" and r["test_acc"] is not None
    pruning = r["pruning"]
    assert pruning["stage"] == "final" and pruning["candidate"] == "spt" and pruning["budget"] == 10_000
    assert r["config"]["decisions"]["pruning"] == pruning["decision"]
    # test_vit: width 64, 6 blocks, MLP 192; the decided count is the formula's and within the budget.
    assert r["params"]["tunable"] == pruning["tunable"] <= 10_000
    costs = {"q": 2 * 128, "k": 2 * 128, "v": 2 * 128, "proj": 2 * 128, "fc1": 2 * 256, "fc2": 2 * 256}
    structured = sum(costs[op] * n for op, n in pruning["structured_by_op"].items())
    assert pruning["tunable"] == 64 + structured + pruning["unstructured_entries"]
    assert pruning["sensitivity_images"] == 32  # all of train800 here (fewer than 512 images)
