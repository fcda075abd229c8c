"""NOAH: the supernet's weight sharing, the subnet formula, the evolutionary search, the fixed subnet, the CLI."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import timm
import torch

from benchmark.cli import main
from methods import get_method
from methods._noah_search import Evolution, split
from methods.noah import MODULES, NOAHConfig, NOAHModel, SlicedPrompt, subnet_params
from tests.conftest import argv, tiny_vit

# The published caltech101 subnet (experiments/NOAH/subnet/VTAB/ViT-B_prompt_caltech101.yaml, RETRAIN).
CALTECH101 = {
    "prompt": [5, 10, 1, 5, 10, 1, 10, 1, 10, 1, 10, 1],
    "lora": [1, 10, 10, 10, 5, 10, 10, 10, 5, 1, 10, 1],
    "adapter": [10, 1, 5, 10, 10, 1, 5, 5, 10, 1, 5, 10],
}


def tiny_model(seed: int = 0, **options) -> tuple[NOAHConfig, NOAHModel]:
    config = dataclasses.replace(NOAHConfig.tiny(), **options)
    torch.manual_seed(seed)
    return config, config.build(tiny_vit(), 3)


def as_state(widths: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {f"{k}_dims": torch.tensor(w, dtype=torch.int32) for k, w in widths.items()}


def test_a_narrower_subnet_is_the_widest_with_the_extra_rows_zeroed():
    _, model = tiny_model()
    model.eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    narrow = {"prompt": [2, 2, 2], "lora": [1, 0, 1], "adapter": [0, 1, 2]}
    model.arch = narrow
    model.set_widths(narrow)
    out = model(x)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for i in range(3):  # the widest subnet, whose rows past each narrow width contribute nothing
            lora, adapter = zeroed.module("lora", i), zeroed.module("adapter", i)
            lora.b[:, narrow["lora"][i] :] = 0
            adapter.up.weight[:, narrow["adapter"][i] :] = 0
            if narrow["adapter"][i] == 0:
                adapter.up.bias.zero_()
    zeroed.arch = None  # evaluation mode of the supernet: every module at its full width
    torch.testing.assert_close(zeroed(x), out, rtol=0, atol=1e-6)
    prompt = SlicedPrompt(4, 8, init_rows=100, dropout=0.0)
    prompt.width = 3
    assert torch.equal(prompt(2)[1], prompt.tokens[:3])


def test_the_supernet_samples_a_subnet_per_training_step_and_gives_every_module_a_gradient():
    _, model = tiny_model()
    x = torch.randn(2, 3, 32, 32)
    seen = set()
    for _ in range(4):
        model.zero_grad()
        model(x).sum().backward()
        seen.add(tuple(model.module(k, i).width for k in MODULES for i in range(3)))
        assert all(p.grad is not None for p in model.trainable_parameters())
    assert len(seen) > 1
    depths = [len([w for w in ws if w]) for ws in split(next(iter(seen)), 3)]
    assert all(d in (1, 2, 3) for d in depths)


def test_subnet_and_supernet_counts_on_vit_b16():
    config = NOAHConfig()
    with torch.device("meta"):
        backbone = timm.create_model("vit_base_patch16_224", num_classes=0)
    supernet = config.build(copy.deepcopy(backbone), 100)
    assert supernet.param_report().tunable == 12 * (7 * 768 * 10 + 10 + 768) == 654_456
    subnet = config.build(copy.deepcopy(backbone), 100)
    subnet.apply_pruning(as_state(CALTECH101))
    assert subnet.param_report().tunable == subnet_params(768, CALTECH101) == 426_313
    assert subnet.param_report().head == 769 * 100
    assert config.search_params(768, CALTECH101) == 426_313 + (5 + 100) * 768  # the code's count: 506,953


def test_the_search_respects_the_limit_and_is_deterministic_under_a_seed():
    count = lambda c: sum(c)  # noqa: E731
    fitness = lambda c: (hash(c) % 1000) / 1000  # noqa: E731

    def run(seed: int) -> tuple[tuple[int, ...], Evolution]:
        search = Evolution(4, (1, 5, 10), (1, 2, 4), count, fitness, limit=40, population=10, generations=3,
                           select=4, mutation_num=5, crossover_num=5, seed=seed)  # fmt: skip
        return search.run()[0], search

    best, search = run(0)
    assert all(count(c) <= 40 for c in search.scores) and count(best) <= 40
    assert best == max(search.scores, key=lambda c: search.scores[c])  # the best candidate evaluated
    assert run(0)[0] == best and list(run(0)[1].scores) == list(search.scores)
    assert list(run(1)[1].scores) != list(search.scores)
    for cand in search.scores:  # every module: widths in its first `depth` blocks, zero after
        for widths in split(cand, 4):
            depth = next((i for i, w in enumerate(widths) if w == 0), 4)
            assert depth in (1, 2, 4) and all(w in (1, 5, 10) for w in widths[:depth]) and not any(widths[depth:])


def test_prune_candidates_gives_one_subnet_within_the_limit_deterministically():
    config, model = tiny_model(param_limit=0.0012, population=4, generations=1)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32, generator=gen), torch.randint(3, (4,), generator=gen))]
    first = config.prune_candidates(model, {}, iter(batches))
    again = config.prune_candidates(model, {}, iter(batches))
    assert len(first) == 1 and first[0].info == again[0].info
    info, state = first[0].info, first[0].state
    assert info["search_params"] <= 1200 and set(state) == {"prompt_dims", "lora_dims", "adapter_dims"}
    assert all(t.dtype == torch.int32 and t.shape == (3,) for t in state.values())
    assert model.arch is None  # the supernet is left as it was


def test_the_fixed_subnet_trains_only_its_modules():
    config, model = tiny_model()
    widths = {"prompt": [2, 0, 0], "lora": [1, 2, 0], "adapter": [2, 2, 1]}
    model.apply_pruning(as_state(widths))
    assert model.module("prompt", 1) is None and model.module("lora", 2) is None
    assert model.param_report().tunable == subnet_params(48, widths) == 2 * 48 + 4 * 48 * 3 + 3 * 48 + 5 * 96 + 5
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable == {id(p) for m in model.tunable_modules() for p in m.parameters()} | {
        id(p) for p in model.head.parameters()
    }
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in trainable}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=0.1)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.tunable_parameters())
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    with pytest.raises(ValueError, match="lora_dims"):
        config.build(tiny_vit(), 3).apply_pruning({"prompt_dims": torch.zeros(3), "adapter_dims": torch.zeros(3)})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"param_limit": 0.0}, "param_limit=0.0 must be in (0, inf)"),
        ({"dims": "0,5"}, "dims='0,5' must be distinct integers >= 1"),
        ({"dims": "5,x"}, "dims='5,x' must be comma-separated integers"),
        ({"depths": "3,3"}, "depths='3,3' must be distinct"),
        ({"population": 0}, "population=0 must be at least 1"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        NOAHConfig(**options)


def test_backbone_dependent_options_are_refused():
    with pytest.raises(ValueError, match="depths='3,6,9,12' goes beyond the backbone's 3 blocks"):
        NOAHConfig().check_backbone(tiny_vit())
    with pytest.raises(ValueError, match="param_limit=1e-05 is below the smallest subnet's"):
        NOAHConfig.tiny().with_options({"param_limit": "0.00001"}).check_backbone(tiny_vit())


def test_cli_refuses_a_limit_below_the_smallest_subnet(synth_root, tmp_path, capsys):
    code = main(argv(f"bench --method noah --tasks camelyon --data-root {synth_root} --results {tmp_path}/r",
                     "--set", "depths=3,6", "--set", "param_limit=0.000001"))  # fmt: skip
    assert code == 2 and "param_limit=1e-06 is below the smallest subnet's" in capsys.readouterr().err
    assert not (tmp_path / "r" / "runs").exists()


def test_noah_pipeline_end_to_end(synth_root, tmp_path):
    results = tmp_path / "results"
    args = argv(f"bench --method noah --tasks camelyon --data-root {synth_root} --results {results}",
                "--epochs", "2", "--batch-size", "32", "--seeds", "42",
                *[a for o in ("supernet_epochs=2", "population=4", "generations=2", "dims=1,2", "depths=3,6",
                              "supernet_rows=4") for a in ("--set", o)])  # fmt: skip
    assert main(args) == 0
    task_dir = results / "runs/noah/camelyon"
    dense = json.loads((task_dir / "final-prune/dense.json").read_text())
    assert dense["status"] == "ok" and dense["pruning"]["stage"] == "dense"
    recipe = dense["config"]["method_config"]["recipe"]
    assert recipe["epochs"] == 2 and recipe["lr"] == 5e-4  # the supernet's stage: supernet_epochs, supernet_lr
    assert dense["params"]["tunable"] == 6 * (7 * 64 * 2 + 2 + 64)  # test_vit: 6 blocks of width 64, R = 2
    decided = {p.name for p in (task_dir / "decisions").iterdir()}
    assert decided == {"final-prune-candidates.safetensors", "final-prune-choice.json"}
    final = json.loads((task_dir / "final-s42.json").read_text())
    assert final["config"]["method_config"]["recipe"]["lr"] == 1e-3  # the retraining recipe
    assert final["status"] == "ok" and final["test_acc"] is not None
    pruning = final["pruning"]
    widths = {k: pruning[f"{k}_dims"] for k in MODULES}
    assert pruning["candidate"] == "subnet" and all(len(w) == 6 for w in widths.values())
    assert final["params"]["tunable"] == pruning["subnet_params"] == subnet_params(64, widths)
    assert get_method("noah")().recipe.epochs == 100
