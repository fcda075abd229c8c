"""GPS: the parameter formula, the selection rule against a hand computation, sparse tuning, merging, the SupCon
loss, refusals, and the selection stage end to end through the CLI."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from benchmark.cli import main
from benchmark.run.backbone import create_backbone
from methods._sparse import SparselyTuned
from methods.gps import GPS_TASKS, GPSConfig, TwoViews, supcon_loss
from tasks import TASKS
from tests.conftest import argv, tiny_vit

NUM_CLASSES = 3


def batches(n: int = 2, size: int = 6, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 32, 32, generator=g), torch.arange(size) % NUM_CLASSES) for _ in range(n)]


def test_vit_b16_count_and_the_vtab_average():
    backbone = create_backbone("vit_base_patch16_224", pretrained=False, device="meta")
    outs = 768 + 12 * (3 * 768 + 768 + 3072 + 768)  # patch embedding, then qkv, proj, fc1, fc2 per block
    assert outs == 83_712
    for config, tunable in ((GPSConfig(), 2 * outs), (GPSConfig(k=2), 3 * outs), (GPSConfig(train_biases=False), outs),
                            (GPSConfig(patch_embed=False, train_biases=False), outs - 768)):  # fmt: skip
        model = config.build(copy.deepcopy(backbone), 10)
        assert model.param_report() == config.expected_params(backbone, 10)
        assert model.param_report().tunable == tunable
    assert GPSConfig().expected_params(backbone, 10).tunable == 167_424
    # The paper's 0.22 M (VTAB, head included): the scripts' K per task and each task's head.
    total = [GPSConfig().for_task(t.id).expected_params(backbone, t.num_classes) for t in TASKS]
    assert len(total) == 19 == len(GPS_TASKS)
    mean = sum(r.tunable + r.head for r in total) / len(total)
    assert round(mean / 1e6, 2) == 0.21


def reference_supcon(features: torch.Tensor, labels: torch.Tensor, t: float) -> torch.Tensor:
    """Khosla et al.'s L_out written out with loops: features [B, V, D]."""
    b, v, _ = features.shape
    z = [F.normalize(features[i, a], dim=0) for a in range(v) for i in range(b)]
    y = [int(labels[i]) for _ in range(v) for i in range(b)]
    losses = []
    for i in range(len(z)):
        others = [a for a in range(len(z)) if a != i]
        denominator = sum(math.exp(float(z[i] @ z[a]) / t) for a in others)
        positives = [p for p in others if y[p] == y[i]]
        losses.append(
            -sum(math.log(math.exp(float(z[i] @ z[p]) / t) / denominator) for p in positives) / len(positives)
        )
    return torch.tensor(sum(losses) / len(losses), dtype=torch.float64)


def test_supcon_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    features, labels = torch.randn(5, 2, 7, generator=g, dtype=torch.float64), torch.tensor([0, 1, 0, 2, 1])
    for t in (0.07, 0.5):
        torch.testing.assert_close(supcon_loss(features, labels, t, t), reference_supcon(features, labels, t))
    # base temperature scales the loss by t / base
    torch.testing.assert_close(supcon_loss(features, labels, 0.5, 0.25), 2 * reference_supcon(features, labels, 0.5))


def test_selection_is_the_top_k_of_the_contrastive_gradient():
    config = GPSConfig(k=3, per_task=False)
    backbone = tiny_vit()
    model = config.build(copy.deepcopy(backbone), NUM_CLASSES)
    data = batches()
    torch.manual_seed(5)
    (candidate,) = config.prune_candidates(model, {}, iter(data))
    assert all(p.grad is None for p in model.parameters())  # the decision leaves no trace on the model
    assert not any(m.module.weight.requires_grad for m in model.modules() if isinstance(m, SparselyTuned))

    # By hand, on the plain timm model: accumulate .backward() over the batches, as the official code does.
    plain = copy.deepcopy(backbone).train()
    views = TwoViews("contrast", "imagenet")  # the same views: the same random draws
    torch.manual_seed(5)
    for x, y in data:
        f = plain.forward_head(plain.forward_features(views(x)), pre_logits=True)
        reference_supcon_loss(f.view(2, len(x), -1).transpose(0, 1), y).backward()
    layers = {"patch_embed.proj": plain.patch_embed.proj}
    layers.update({f"blocks.{i}.{n}": m for i, b in enumerate(plain.blocks) for n, m in b.named_modules()
                   if isinstance(m, torch.nn.Linear)})  # fmt: skip
    assert len(candidate.state) == len(layers) == 1 + 4 * len(backbone.blocks)
    for path, layer in layers.items():
        grad = layer.weight.grad.reshape(layer.weight.shape[0], -1).abs().numpy()
        expected = np.sort(np.argsort(grad, axis=1, kind="stable")[:, -3:], axis=1)
        np.testing.assert_array_equal(candidate.state[f"backbone.{path}.sparse.index"].numpy(), expected, path)
    assert candidate.info["k"] == 3 and candidate.info["selected_weights"] == 3 * sum(
        m.weight.shape[0] for m in layers.values()
    )
    json.dumps(candidate.info)


def reference_supcon_loss(features: torch.Tensor, labels: torch.Tensor, t: float = 0.07) -> torch.Tensor:
    """SupCon as Khosla et al.'s reference implementation computes it (vectorised, stabilised by the row max)."""
    b, v = features.shape[:2]
    z = torch.cat(torch.unbind(F.normalize(features, dim=2), dim=1))
    logits = z @ z.T / t
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    not_self = 1.0 - torch.eye(b * v)
    positives = (labels[:, None] == labels[None, :]).float().repeat(v, v) * not_self
    log_prob = logits - torch.log((logits.exp() * not_self).sum(1, keepdim=True))
    return -((positives * log_prob).sum(1) / positives.sum(1)).mean()


def perturbed(config: GPSConfig, seed: int = 0):
    """A model with a random selection of K entries per neuron applied, and that selection."""
    torch.manual_seed(seed)
    model = config.build(tiny_vit(), NUM_CLASSES)
    state = {}
    for key, wrapper in zip(model.selection_state(), model.wrapped.values(), strict=True):
        weight = wrapper.module.weight.reshape(wrapper.module.weight.shape[0], -1)
        state[key] = torch.rand(weight.shape).topk(config.k, dim=1).indices.sort(dim=1).values
    model.apply_pruning(state)
    return model, state


def test_only_the_selected_entries_move():
    model, state = perturbed(GPSConfig(k=2, per_task=False))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {path: w.weight().detach().clone() for path, w in model.wrapped.items()}
    biases = {path: w.module.bias.detach().clone() for path, w in model.wrapped.items()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    for path, w in model.wrapped.items():
        moved = (w.weight().detach() != before[path]).reshape(w.module.weight.shape[0], -1)
        selected = torch.zeros_like(moved).scatter_(1, state[f"backbone.{path}.sparse.index"], True)
        assert torch.equal(moved, selected), path  # every selected entry moved, nothing else did
        assert not torch.equal(w.module.bias, biases[path])  # the code trains these layers' biases
    assert torch.equal(model.backbone.blocks[0].norm1.bias, frozen["backbone.blocks.0.norm1.bias"])
    # a new decision restarts the deltas at zero
    model.apply_pruning(state)
    assert all(not w.deltas["weight"].values.any() for w in model.wrapped.values())
    with pytest.raises(ValueError, match="missing"):
        model.apply_pruning({})


def test_merged_backbone_matches_the_model():
    model, _ = perturbed(GPSConfig(k=3, per_task=False), seed=1)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    merged = model.merged_backbone().eval()
    assert set(merged.state_dict()) == set(tiny_vit().state_dict())
    assert not any(isinstance(m, SparselyTuned) for m in merged.modules())
    x = batches(1)[0][0]
    with torch.no_grad():
        expected = model(x)
        logits = model.head(merged.forward_head(merged.forward_features(x), pre_logits=True))
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_bad_k_is_refused():
    with pytest.raises(ValueError, match="k=0 must be at least 1; set k=1"):
        GPSConfig(k=0)
    with pytest.raises(ValueError, match="k=49 exceeds the 48 inputs per neuron of blocks.0.attn.qkv; set k=48"):
        GPSConfig(k=49).build(tiny_vit(), NUM_CLASSES)
    GPSConfig(k=48).build(tiny_vit(), NUM_CLASSES)


def test_bad_k_exits_2_before_training(synth_root, tmp_path, capsys):
    for k, message in (("0", "k=0 must be at least 1"), ("65", "k=65 exceeds the 64 inputs per neuron")):
        code = main(argv(f"bench --method gps --tasks camelyon --data-root {synth_root} --results {tmp_path}/r",
                         "--epochs", "2", "--set", f"k={k}"))  # fmt: skip
        assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "r" / "runs").exists()


def test_gps_selection_stage_end_to_end(synth_root, tmp_path):
    results = tmp_path / "results"
    args = argv(f"bench --method gps --tasks camelyon --data-root {synth_root} --results {results}",
                "--epochs", "2", "--seeds", "42", "--set", "k=1")  # fmt: skip
    assert main(args) == 0
    task_dir = results / "runs/gps/camelyon"
    decided = {p.name for p in (task_dir / "decisions").iterdir()}
    assert decided == {"final-prune-candidates.safetensors", "final-prune-choice.json"}
    stored = load_file(str(task_dir / "decisions/final-prune-candidates.safetensors"))
    # test_vit: 6 blocks of width 64 (MLP 192), patch 16: 64 + 6·(192 + 64 + 192 + 64) neurons, one weight each
    neurons = 64 + 6 * (192 + 64 + 192 + 64)
    assert sum(v.numel() for v in stored.values()) == neurons
    (final,) = [json.loads(p.read_text()) for p in task_dir.glob("final-s*.json")]
    assert final["status"] == "ok" and final["test_acc"] is not None
    assert final["config"]["decisions"]["pruning"]
    pruning = final["pruning"]
    assert pruning["stage"] == "final" and pruning["k"] == 1 and pruning["selected_weights"] == neurons
    assert final["params"]["tunable"] == 2 * neurons  # the selected weights and these layers' biases
