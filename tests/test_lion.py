"""LION (the suite's reconstruction) against its spec: solver, implicit gradients, contractivity,
lottery-ticket pruning and rewinding, robust training, solver statistics in results."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from benchmark.cli import main
from methods._lipschitz import conv_operator_bound, kernel_bound
from methods.lion import InputImplicitLayer, LIONConfig, OutputImplicitLayer, magnitude_masks
from tests.conftest import argv, tiny_vit

C = 5


def randomise(module: torch.nn.Module, scale: float = 0.5) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return module


def zero_padded_norm(weight: torch.Tensor, size: int, iters: int = 300) -> float:
    """Power iteration on the actual zero-padded convolution and its transpose."""
    x = torch.randn(1, weight.shape[1], size, size, dtype=weight.dtype)
    for _ in range(iters):
        x = F.conv_transpose2d(F.conv2d(x, weight, padding=1), weight, padding=1)
        x = x / x.norm()
    return (F.conv2d(x, weight, padding=1).norm() / x.norm()).item()


def test_conv_bounds_are_upper_bounds_of_the_operator_norm():
    torch.manual_seed(0)
    for _ in range(5):
        w = torch.randn(6, 6, 3, 3, dtype=torch.float64)
        true = zero_padded_norm(w, 12)
        operator = conv_operator_bound(w, (12, 12)).item()
        assert true <= operator * (1 + 1e-9) and operator <= kernel_bound(w).item() * (1 + 1e-9)
        assert operator < 1.25 * true  # tight up to boundary effects


@pytest.mark.parametrize("layer_kind", ["input", "output"])
def test_solver_reaches_its_tolerance_and_the_fixed_point_holds(layer_kind):
    torch.manual_seed(0)
    config = LIONConfig(in_channels=4, in_groups=2, out_dim=16, tol=1e-5, max_iter=60)
    if layer_kind == "input":
        layer = randomise(InputImplicitLayer(config)).eval()
        x = torch.randn(3, 3, 12, 12)
        a = layer.contracted_A((12, 12))
        injection = layer.norm(F.conv2d(x, layer.B.weight, layer.B.bias, padding=1))

        def f(z):
            return torch.tanh(F.conv2d(z, a, padding=1) + injection)
    else:
        layer = randomise(OutputImplicitLayer(32, config)).eval()
        h = torch.randn(3, 32)
        w, injection = layer.contracted_W(), F.linear(h, layer.U.weight) + layer.b

        def f(z):
            return torch.tanh(F.linear(z, w) + injection)

    with torch.no_grad():
        z = layer.solve(f, torch.zeros_like(injection))
        residual = ((f(z) - z).flatten(1).norm(dim=1) / f(z).flatten(1).norm(dim=1)).max().item()
    assert residual < 1e-5
    stats = layer.stats.pop()
    assert stats["f_residual"] < 1e-5 and stats["f_unconverged"] == 0 and 1 <= stats["f_iters"] <= 60
    assert layer.stats.pop() == {}


@pytest.mark.parametrize("gradient", ["implicit", "phantom"])
def test_implicit_gradients_match_a_long_unrolled_iteration(gradient):
    torch.manual_seed(0)
    config = LIONConfig(out_dim=12, tol=1e-10, max_iter=200, backward_tol=1e-12, backward_max_iter=200,
                        gradient=gradient)  # fmt: skip
    layer = randomise(OutputImplicitLayer(20, config)).double().train()
    h = torch.randn(4, 20, dtype=torch.float64)
    params = [layer.W.weight, layer.U.weight, layer.b]
    implicit = torch.autograd.grad(layer(h).pow(2).sum(), params)
    # Reference: 200 fixed-point steps, differentiated through every step.
    w, injection = layer.contracted_W(), F.linear(h, layer.U.weight) + layer.b
    z = torch.zeros(4, 12, dtype=torch.float64)
    for _ in range(200):
        z = torch.tanh(F.linear(z, w) + injection)
    unrolled = torch.autograd.grad((h + F.linear(z, layer.V.weight)).pow(2).sum(), params)
    errors = [((a - b).norm() / b.norm()).item() for a, b in zip(implicit, unrolled, strict=True)]
    if gradient == "implicit":
        assert max(errors) < 1e-4, errors
    else:  # the one-step (Jacobian-free) gradient is an approximation, but points the same way
        cosines = [
            F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
            for a, b in zip(implicit, unrolled, strict=True)
        ]
        assert min(cosines) > 0.5, cosines
    # Only implicit differentiation solves an adjoint fixed point, so only it has backward statistics.
    stats = layer.stats.pop()
    assert ("b_iters" in stats) == (gradient == "implicit") and stats.get("b_iters", 1) > 0


def test_identity_at_init_only_o_and_v_learn_first():
    torch.manual_seed(0)
    model = LIONConfig.tiny().build(tiny_vit(), C)
    assert model.input_layer.O.weight.abs().sum() == 0 and model.output_layer.V.weight.abs().sum() == 0
    F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1])).backward()
    assert model.input_layer.O.weight.grad.abs().sum() > 0 and model.output_layer.V.weight.grad.abs().sum() > 0
    assert model.output_layer.W.weight.grad.abs().sum() == 0 and model.input_layer.A.weight.grad.abs().sum() == 0


def test_contractivity_holds_after_optimiser_steps():
    torch.manual_seed(0)
    model = LIONConfig.tiny().build(tiny_vit(), C)
    opt = torch.optim.SGD(model.trainable_parameters(), lr=5.0)
    for step in range(5):
        with torch.no_grad():  # make the layers non-trivial so every weight receives gradient
            model.input_layer.O.weight.add_(0.1)
            model.output_layer.V.weight.add_(0.1)
        loss = F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.arange(4) % C)
        opt.zero_grad()
        loss.backward()
        opt.step()
        a = model.input_layer.contracted_A((32, 32)).detach().double()
        w = model.output_layer.contracted_W().detach()
        assert zero_padded_norm(a, 32) <= 0.9 * (1 + 1e-6), step
        assert torch.linalg.matrix_norm(w, ord=2).item() <= 0.9 * (1 + 1e-5), step
    assert model.input_layer.A.weight.abs().max() > 0.5  # the raw weight grew; only its use is bounded


def test_vit_b16_counts_dense_and_pruned():
    shapes = {"A": (8, 8, 3, 3), "B": (8, 3, 3, 3), "O": (3, 8, 1, 1), "W": (64, 64), "U": (64, 768), "V": (768, 64)}
    weights = {k: torch.randn(s) for k, s in shapes.items()}
    masks = magnitude_masks(weights, 0.5, "per_tensor")
    kept = {k: int(m.sum()) for k, m in masks.items()}
    assert kept == {"A": 288, "B": 108, "O": 12, "W": 2048, "U": 24576, "V": 24576}
    unpruned = 8 + 16 + 3 + 64  # B bias, GN affine, O bias, b
    assert sum(kept.values()) + unpruned == 51_699
    from benchmark.run.backbone import create_backbone

    vit_b = create_backbone("vit_base_patch16_224", pretrained=False, device="meta")
    assert LIONConfig().expected_params(vit_b, 10).tunable == 843 + 102_464 == 103_307
    global_masks = magnitude_masks(weights, 0.5, "global")
    assert sum(int(m.sum()) for m in global_masks.values()) == round(0.5 * sum(w.numel() for w in weights.values()))


def _train(model, steps: int, lr: float = 0.05) -> None:
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=lr, weight_decay=0.1)
    for _ in range(steps):
        loss = F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.arange(4) % C)
        reg = model.regularization()
        opt.zero_grad()
        (loss if reg is None else loss + reg).backward()
        opt.step()


def test_pruning_keeps_the_fraction_rewinds_bit_for_bit_and_masked_weights_stay_zero():
    config = LIONConfig.tiny()
    torch.manual_seed(0)
    dense = config.build(tiny_vit(), C)
    initial = {k: v.clone() for k, v in dense.tunable_state_dict().items()}
    _train(dense, 4)
    (candidate,) = config.prune_candidates(dense, initial, [])
    torch.manual_seed(123)
    model = config.build(tiny_vit(), C)
    model.apply_pruning(candidate.state)
    assert model.pruned and model.regularization() is None  # robust training only in the dense phase
    state = model.tunable_state_dict()
    weights = model.prunable_weights()
    for name, weight in weights.items():
        layer = model.input_layer if name.startswith("in.") else model.output_layer
        mask = getattr(layer, f"{name.split('.')[1]}_mask")
        assert int(mask.numel() - mask.sum()) == round(0.5 * mask.numel())  # exactly the fraction
        # survivors rewound to their initial values bit for bit, pruned entries exactly 0
        path = next(k for k, v in model.named_parameters() if v is weight)
        assert torch.equal(weight.detach(), initial[path] * mask)
    for key in ("output_layer.b", "input_layer.B.bias", "input_layer.norm.weight", "head.weight"):
        assert torch.equal(state[key], initial[key])
    assert model.param_report().nonzero_tunable == candidate.info["nonzero_tunable"]
    _train(model, 4)
    for name, weight in weights.items():
        layer = model.input_layer if name.startswith("in.") else model.output_layer
        mask = getattr(layer, f"{name.split('.')[1]}_mask")
        assert weight.detach()[mask == 0].abs().sum() == 0, name
    assert model.param_report().nonzero_tunable == candidate.info["nonzero_tunable"]


def test_robust_training_penalises_the_weights_below_the_quantile():
    config = LIONConfig.tiny()
    model = config.build(tiny_vit(), C)
    expected = 0.0
    for w in model.prunable_weights().values():
        t = torch.quantile(w.detach().abs().flatten(), 0.5)
        expected += w.detach().abs()[w.detach().abs() < t].sum()
    assert model.regularization().item() == pytest.approx(1e-4 * float(expected), rel=1e-5)
    assert LIONConfig(robust_strength=0.0).build(tiny_vit(), C).regularization() is None


def test_options_are_validated():
    for bad in ({"in_groups": 3}, {"gamma": 1.0}, {"solver": "newton"}, {"prune_fraction": 1.0}):
        with pytest.raises(ValueError):
            LIONConfig(**bad)


@pytest.mark.slow
def test_lion_bench_trains_above_chance_with_solver_statistics_and_pruned_counts(synth_root, tmp_path):
    results = tmp_path / "results"
    args = argv(f"bench --method lion --tasks camelyon,svhn --data-root {synth_root} --results {results}",
                "--epochs", "6", "--batch-size", "16", "--seeds", "42", "--lr", "0.01")  # fmt: skip
    assert main(args) == 0
    finals = {p.parent.name: json.loads(p.read_text()) for p in (results / "runs/lion").glob("*/final-s42.json")}
    assert set(finals) == {"camelyon", "svhn"}
    for task, r in finals.items():
        assert r["status"] == "ok", r["error"]
        train = r["diagnostics"]["train"]
        assert len(train) == 6
        assert {"in/f_iters", "in/f_residual", "in/b_iters", "out/f_iters", "out/f_residual", "out/b_iters"} <= set(
            train[0]
        )
        assert r["diagnostics"]["eval"][0]["out/f_residual"] < 1e-3
        assert r["pruning"]["candidate"] == "magnitude50"
        assert r["params"]["nonzero_tunable"] == r["pruning"]["nonzero_tunable"] < r["params"]["tunable"]
        dense = json.loads((results / f"runs/lion/{task}/final-prune/dense.json").read_text())
        assert dense["params"]["nonzero_tunable"] == dense["params"]["tunable"]
    assert finals["svhn"]["test_acc"] > 30  # chance: 10
    assert "lion" in (results / "leaderboard.md").read_text()


def test_params_on_vit_b16_for_every_task(capsys):
    from tasks import TASKS

    assert main(["params", "--backbone", "vit_base_patch16_224", "--methods", "lion", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["task"] for r in rows] == [t.id for t in TASKS]
    assert all(r["tunable"] == r["nonzero_tunable"] == 103_307 for r in rows)
