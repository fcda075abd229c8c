"""The baselines start and train as the official runs behind their reference rows did (what running the official code
showed: docs/methods/adapters.md and reparameterisation.md), and a result records the training semantics that produced it.

- `lora`, `adapter`: NOAH's `VisionTransformer.__init__` re-initialises every Linear after the blocks are built;
- `adapter_houlsby`: PETL_Vision's timm `init_weights` does the same, and its block applies drop-path twice on
  the adapter path in training;
- `repadapter`: the official main branch trains with cross-entropy alone;
- each method has a semantic version, recorded in every result; resume refuses results of another version.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from timm.layers import DropPath, trunc_normal_
from timm.models import named_apply
from timm.models.vision_transformer import VisionTransformer, init_weights_vit_timm
from torch import nn

from benchmark.cli import main
from benchmark.run.resolve import config_from_record
from methods import PeftModel, get_method, list_methods
from methods._bottleneck import ResidualBottleneck
from tests.conftest import argv, tiny_vit
from tests.test_launch import slurm_unavailable

D = 48  # tiny_vit's width
TINY = dict(img_size=32, patch_size=8, embed_dim=D, depth=3, num_heads=3, mlp_ratio=2.0, num_classes=0)  # tiny_vit
VERSION_2 = {"lora", "adapter", "adapter_houlsby", "repadapter"}


def build(name: str, seed: int = 0, **options) -> PeftModel:
    """The method on `tiny_vit` (its weights the same for every call), with the config's drop-path rate."""
    config = get_method(name).tiny()
    if options:
        config = config.with_options({k: str(v) for k, v in options.items()})
    backbone = tiny_vit()
    if rate := config.backbone_kwargs().get("drop_path_rate"):  # tiny_vit's weights, timm's drop-path rule
        with_rate = VisionTransformer(**TINY, drop_path_rate=rate)
        with_rate.load_state_dict(backbone.state_dict())
        backbone = with_rate
    torch.manual_seed(seed)
    return config.build(backbone, 5)


def images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def noah_init_vit_weights(m: nn.Module) -> None:
    """NOAH's `_init_vit_weights` as its `VisionTransformer.init_weights('')` applies it (no name, no jax)."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def as_linear(weight: nn.Parameter) -> nn.Linear:
    """A bias-free Linear holding `weight`, as NOAH's `LoRA_a` / `LoRA_b` are."""
    linear = nn.Linear(1, 1, bias=False, device="meta")  # built on meta: no draw from the random stream
    linear.weight = weight
    return linear


def tunable(model: PeftModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.tunable_state_dict().items() if not k.startswith("head.")}


def assert_same_state(model: PeftModel, expected: PeftModel) -> None:
    got, want = model.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def logits_of_the_frozen_backbone(model: PeftModel) -> torch.Tensor:
    reference = get_method("linear")().build(tiny_vit(), 5).eval()
    reference.head.load_state_dict(model.head.state_dict())
    return reference(images())


# -- 1. lora and adapter: NOAH's effective initialisation ---------------------------------------------------
def test_lora_noah_init_is_noahs_construction_then_its_reinit_of_every_linear():
    """Built as NOAH builds it: every block's branch with the paper's init, then `apply(_init_weights)` over the
    model in module order (per block: LoRA_a, then LoRA_b). The frozen Linears are left out: the checkpoint is
    loaded over them afterwards (their draws only move the random stream, which no two code bases share)."""
    assert get_method("lora")().init == "noah"
    expected = build("lora", init="paper")  # the same seed: the same construction draws
    for branch in expected.tunable_modules():
        for a, b in zip(branch.a, branch.b, strict=True):
            nn.Sequential(as_linear(a), as_linear(b)).apply(noah_init_vit_weights)
    model = build("lora")
    assert_same_state(model, expected)  # branches exactly, backbone and head untouched
    weights = torch.cat([p.flatten() for k, p in tunable(model).items()])
    assert weights.numel() == 3 * 4 * D * 8 and 0.018 < weights.std() < 0.022 and weights.abs().max() < 0.1
    # Not the identity at init (B ≠ 0), so the contract test must not claim it; the paper's init is.
    assert not get_method("lora")().identity_at_init and get_method("lora")(init="paper").identity_at_init
    assert not torch.allclose(model.eval()(images()), logits_of_the_frozen_backbone(model), atol=1e-6)
    paper = build("lora", init="paper").eval()
    torch.testing.assert_close(paper(images()), logits_of_the_frozen_backbone(paper), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("targets", ["qkv", "q,v"])
def test_lora_noah_init_draws_every_pair_truncated_normal(targets):
    model = build("lora", targets=targets)
    for branch in model.tunable_modules():
        for p in [*branch.a, *branch.b]:
            assert torch.count_nonzero(p) == p.numel() and p.abs().max() < 0.1


def test_adapter_noah_init_is_noahs_construction_then_its_reinit_of_every_linear():
    """NOAH's `AdapterSuper` declares xavier weights and N(0, 1e-6²) biases (ln1 = down, then ln2 = up); the
    model's `apply(_init_weights)` after all blocks re-draws them: weights truncated-normal 0.02, biases 0."""
    assert get_method("adapter")().init == "noah"
    expected = build("adapter", init="paper")
    for adapter in expected.tunable_modules():
        adapter.apply(noah_init_vit_weights)
    model = build("adapter")
    assert_same_state(model, expected)
    state = tunable(model)
    assert all(torch.count_nonzero(v) == 0 for k, v in state.items() if k.endswith(".bias"))
    weights = torch.cat([v.flatten() for k, v in state.items() if k.endswith(".weight")])
    assert 0.018 < weights.std() < 0.022
    # The paper's (declared) init is still there, and results of version 1 recorded it as `xavier`.
    paper = build("adapter", init="paper")
    assert all(torch.count_nonzero(v) == v.numel() for v in tunable(paper).values())
    assert get_method("adapter").from_dict({"init": "xavier"}).init == "paper"
    assert_same_state(build("adapter", init="xavier"), paper)
    assert not get_method("adapter")().identity_at_init and get_method("adapter")(init="lora").identity_at_init


# -- 2. adapter_houlsby: PETL_Vision's init_weights and its second drop-path ---------------------------------
def test_houlsby_petl_init_is_timms_init_weights_after_construction():
    """`VisionTransformerPETL.__init__` ends with timm's `init_weights`: `named_apply(init_weights_vit_timm)`
    over the model, the adapters (attention side, then MLP side, block by block) included."""
    assert get_method("adapter_houlsby")().init == "petl"
    expected = build("adapter_houlsby", init="paper")
    for adapter in expected.tunable_modules():
        named_apply(init_weights_vit_timm, adapter)
    model = build("adapter_houlsby")
    assert_same_state(model, expected)
    assert all(torch.count_nonzero(v) == 0 for k, v in tunable(model).items() if k.endswith(".bias"))


def petl_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """PETL_Vision's `BlockPETL.forward` with `ft_attn_module = ft_mlp_module = adapter`, mode `sequential_after`
    (`rand_h_adapter`): the drop-path on the sub-block's output, and again on the adapter's."""
    attn, adapter1 = block.attn.module, block.attn.after
    mlp, adapter2 = block.mlp.module, block.mlp.after
    x_original = block.drop_path1(block.ls1(attn(block.norm1(x))))
    x = x + block.drop_path1(block.ls1(adapter1(x_original)))  # the adapter adds its own residual
    x_original = block.drop_path2(block.ls2(mlp(block.norm2(x))))
    return x + block.drop_path2(block.ls2(adapter2(x_original)))


def test_houlsby_applies_the_drop_path_twice_in_training_as_petl_vision():
    model = build("adapter_houlsby", drop_path_rate=0.5).train()
    block = model.backbone.blocks[2]  # timm's stochastic-depth rule: rate 0.5 in the last of 3 blocks
    assert isinstance(block.attn.after, ResidualBottleneck) and isinstance(block.mlp.after, ResidualBottleneck)
    for wrapper, own in ((block.attn, block.drop_path1), (block.mlp, block.drop_path2)):
        assert isinstance(wrapper.drop_path, DropPath) and wrapper.drop_path.drop_prob == own.drop_prob == 0.5
    x = torch.randn(16, 17, D)
    torch.manual_seed(11)
    expected = petl_block(block, x)
    torch.manual_seed(11)
    torch.testing.assert_close(block(x), expected, rtol=0, atol=0)
    # Once (the documented alternative) is another function in training.
    once = build("adapter_houlsby", drop_path_rate=0.5, drop_path_twice=False).train()
    assert once.backbone.blocks[2].attn.drop_path is None
    torch.manual_seed(11)
    assert not torch.allclose(once.backbone.blocks[2](x), expected)


def test_houlsby_eval_function_is_unchanged_by_the_second_drop_path():
    twice = build("adapter_houlsby", drop_path_rate=0.5).eval()
    once = build("adapter_houlsby", drop_path_rate=0.5, drop_path_twice=False).eval()
    assert_same_state(twice, once)
    torch.testing.assert_close(twice(images()), once(images()), rtol=0, atol=0)
    block = twice.backbone.blocks[2]
    x = torch.randn(2, 17, D)
    with torch.no_grad():
        mid = x + block.attn.after(block.attn.module(block.norm1(x)))
        expected = mid + block.mlp.after(block.mlp.module(block.norm2(mid)))
        torch.testing.assert_close(block(x), expected, rtol=0, atol=0)


# -- 3. repadapter: cross-entropy alone ----------------------------------------------------------------------
def test_repadapter_trains_with_cross_entropy_alone_unless_asked():
    assert get_method("repadapter")().sparse_lambda == 0
    assert build("repadapter").regularization() is None
    assert build("repadapter", sparse_lambda=0.5).regularization() is not None


# -- 4. the method's semantic version: recorded, and resume refuses to mix ---------------------------------
def test_versions_are_bumped_exactly_where_training_semantics_changed():
    versions = {name: get_method(name).version for name in list_methods()}
    assert {n for n, v in versions.items() if v == 2} == VERSION_2
    assert all(v == 1 for n, v in versions.items() if n not in VERSION_2)


def run_args(synth_root: Path, results: Path, method: str, *extra: str) -> list[str]:
    return argv(
        f"run --method {method} --task svhn --data-root {synth_root} --results {results}",
        "--epochs", "1", "--batch-size", "32", *extra,
    )  # fmt: skip


def only_result(results: Path) -> tuple[Path, dict]:
    [path] = [p for p in results.rglob("*.json") if "runs" in p.parts]
    return path, json.loads(path.read_text())


@pytest.mark.parametrize(
    ("method", "field", "default", "option", "value"),
    [
        ("lora", "init", "noah", "init=paper", "paper"),
        ("adapter", "init", "noah", "init=paper", "paper"),
        ("adapter_houlsby", "drop_path_twice", True, "drop_path_twice=false", False),
        ("repadapter", "sparse_lambda", 0.0, "sparse_lambda=1", 1.0),
    ],
)
def test_the_result_records_the_choice_and_the_version_that_trained(method, field, default, option, value,
                                                                   synth_root, tmp_path):  # fmt: skip
    for results, extra, expected in ((tmp_path / "a", (), default), (tmp_path / "b", ("--set", option), value)):
        assert main(run_args(synth_root, results, method, *extra)) == 0
        _, record = only_result(results)
        assert record["status"] == "ok"
        assert record["config"]["method_config"][field] == expected
        assert record["config"]["method_version"] == get_method(method).version == 2
        config = config_from_record(record)  # the version key does not get in the way of rebuilding it
        assert getattr(config, field) == expected
        assert json.loads(json.dumps(config.to_dict())) == record["config"]["method_config"]
        provenance = record["provenance"]
        assert re.fullmatch(r"[0-9a-f]{40}", provenance["git_commit"] or "") and provenance["versions"]["peft-bench"]


def bench_args(synth_root: Path, results: Path, *extra: str) -> list[str]:
    return argv(
        f"bench --method lora --tasks svhn --data-root {synth_root} --results {results}",
        "--epochs", "1", "--batch-size", "32", "--seeds", "42", *extra,
    )  # fmt: skip


@pytest.mark.parametrize(("recorded", "launcher"), [(1, "inline"), (None, "inline"), (1, "slurm")])
def test_resume_refuses_a_result_of_another_version_and_rerun_stale_reruns_it(recorded, launcher, synth_root,
                                                                               tmp_path, capsys):  # fmt: skip
    """A result trained under an earlier version of the method (or before versions existed: no key) is refused
    in one line naming both versions and the ways out; `--rerun-stale` reruns it under this version."""
    results = tmp_path / "r"
    launch = {
        "inline": (),
        "local": ("--launcher", "local", "--workers", "1"),
        "slurm": ("--launcher", "slurm", "--slurm-gpus-per-job", "0", "--slurm-cpus-per-job", "1", "--slurm-time",
                  "20", "--threads", "1"),
    }[launcher]  # fmt: skip
    if launcher == "slurm" and (why := slurm_unavailable()):
        pytest.skip(why)
    assert main(bench_args(synth_root, results)) == 0
    path = results / "runs/lora/svhn/final-s42.json"
    record = json.loads(path.read_text())
    assert record["config"]["method_version"] == 2
    if recorded is None:
        del record["config"]["method_version"]
    else:
        record["config"]["method_version"] = recorded
    path.write_text(json.dumps(record))
    old = path.read_bytes()
    capsys.readouterr()

    assert main(bench_args(synth_root, results, *launch)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    was = "version 1" if recorded else "a result that records no version"
    assert f"{path} was trained before lora's training semantics changed (from {was} to version 2)" in err, err
    assert "--rerun-stale" in err and "another --results directory" in err, err
    assert path.read_bytes() == old  # nothing written

    assert main(bench_args(synth_root, results, "--rerun-stale", *launch)) == 0
    rerun = json.loads(path.read_text())
    assert rerun["config"]["method_version"] == 2 and rerun["status"] == "ok"
    assert main(bench_args(synth_root, results, *launch)) == 0  # and it resumes from it now
    assert json.loads(path.read_text()) == rerun
