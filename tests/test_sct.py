"""SCT: the parameter count, the channel-scoring rule, where the module acts, the decision's round trip and its
place in the sweep (a decision made once per task from the pretrained model, carried by every run)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import timm
import torch

from benchmark.cli import main
from methods import get_method
from methods.sct import ChannelTunedBlock, SCTConfig, SCTModel
from tests.conftest import argv, tiny_vit

C = 4  # classes of the tiny model; the scoring batches leave class 3 out


def batches(n: int = 3, batch: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    labels = torch.tensor([0, 0, 1, 2])  # unbalanced classes: the per-class norms are not a plain mean over images
    return [(torch.randn(batch, 3, 32, 32, generator=g), labels[:batch]) for _ in range(n)]


def build(seed: int = 0, **options) -> SCTModel:
    torch.manual_seed(seed)
    return SCTConfig(k=8, **options).build(tiny_vit(), C)


def decided(model: SCTModel) -> dict[str, torch.Tensor]:
    """A selection unlike the default (first K): K random channels per site."""
    g = torch.Generator().manual_seed(9)
    return {key: torch.randperm(48, generator=g)[:8].sort().values for key in model.site_keys()}


def test_vit_b16_count():
    with torch.device("meta"):
        vit = timm.create_model("vit_base_patch16_224", num_classes=0)
    for placement, tunable in (("attn", 111_744), ("mlp", 111_744), ("qkv", 223_488)):
        config = SCTConfig(placement=placement)
        report = config.build(copy.deepcopy(vit), 100).param_report()
        assert report.tunable == tunable == config.expected_params(vit, 100).tunable
    assert not SCTConfig().identity_at_init and SCTConfig().decides_from == "pretrained" and SCTConfig().prunes


def reference_channels(placement: str, k: int = 8) -> dict[str, list[int]]:
    """The official rule, written out independently: hooks on the plain ViT, the class-wise L2 norm over images and
    patch tokens of every channel, its mean over the classes present, `> sorted[D - 1 - K]` (numpy)."""
    vit = tiny_vit().eval()
    feats: dict[str, list[torch.Tensor]] = {}

    def keep(key, t):
        feats.setdefault(key, []).append(t.detach()[:, 1:, :])

    for i, block in enumerate(vit.blocks):
        if placement == "attn":
            block.norm2.register_forward_pre_hook(lambda m, a, i=i: keep(f"blocks.{i}.attn", a[0]))
        elif placement == "mlp":
            block.register_forward_hook(lambda m, a, out, i=i: keep(f"blocks.{i}.mlp", out))
        else:
            block.attn.qkv.register_forward_hook(lambda m, a, out, i=i: keep(f"blocks.{i}.q", out[..., :48]))
            block.attn.qkv.register_forward_hook(lambda m, a, out, i=i: keep(f"blocks.{i}.v", out[..., 96:]))
    labels = []
    with torch.no_grad():
        for x, y in batches():
            vit(x)
            labels.append(y.numpy())
    labels_ = np.concatenate(labels)
    out = {}
    for key, chunks in feats.items():
        f = torch.cat(chunks).double()
        per_class = torch.stack([torch.linalg.vector_norm(f[labels_ == c], dim=(0, 1)) for c in np.unique(labels_)])
        fea = per_class.mean(0).numpy()
        out[key] = np.argwhere(fea > np.sort(fea)[48 - 1 - k]).squeeze().tolist()
    return out


@pytest.mark.parametrize("placement", ["attn", "mlp", "qkv"])
def test_scores_follow_the_official_rule(placement):
    config = SCTConfig(k=8, placement=placement)
    model = build(placement=placement).train()
    (candidate,) = config.prune_candidates(model, {}, batches())
    assert model.training  # restored after scoring in eval mode
    expected = reference_channels(placement)
    assert {k: v.tolist() for k, v in candidate.state.items()} == expected
    assert all(v.dtype == torch.int64 for v in candidate.state.values())
    info = candidate.info
    assert info["k"] == 8 and info["images"] == 12 and info["classes"] == 3 and info["placement"] == placement
    assert info["nonzero_tunable"] == model.param_report().tunable
    json.dumps(info)


def test_module_acts_only_on_the_selected_channels():
    frozen = tiny_vit().eval()
    x = torch.randn(2, 17, 48, generator=torch.Generator().manual_seed(3))
    # attn: the stream entering norm2 is x_mid with x_mid[idx] += W x_mid[idx] + b, the rest bit-identical.
    model = build().eval()
    state = decided(model)
    model.apply_pruning(state)
    block = model.backbone.blocks[0]
    assert isinstance(block, ChannelTunedBlock)
    seen = []
    block.block.norm2.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    f = frozen.blocks[0]
    with torch.no_grad():
        block(x)
        mid = x + f.attn(f.norm1(x))
        idx = state["blocks.0.attn"]
        rest = torch.ones(48, dtype=torch.bool)
        rest[idx] = False
        torch.testing.assert_close(seen[0][..., rest], mid[..., rest], rtol=0, atol=0)
        lin = block.adapter.linear
        torch.testing.assert_close(seen[0][..., idx], mid[..., idx] + lin(mid[..., idx]))
        assert not torch.equal(seen[0][..., idx], mid[..., idx])
    # mlp: the block's output differs from the frozen block's on the selected channels only.
    model = build(placement="mlp").eval()
    state = decided(model)
    model.apply_pruning(state)
    with torch.no_grad():
        out, ref = model.backbone.blocks[0](x), f(x)
    idx = state["blocks.0.mlp"]
    rest = torch.ones(48, dtype=torch.bool)
    rest[idx] = False
    torch.testing.assert_close(out[..., rest], ref[..., rest], rtol=0, atol=0)
    assert (out[..., idx] != ref[..., idx]).all()


def test_zero_init_is_the_frozen_backbone():
    torch.manual_seed(0)
    model = SCTConfig(k=8, adapter_init="zero").build(tiny_vit(), C)
    reference = get_method("linear")().build(tiny_vit(), C)
    reference.head.load_state_dict(model.head.state_dict())
    x = batches()[0][0]
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    assert SCTConfig(adapter_init="zero").identity_at_init


def test_decision_round_trips_through_a_checkpoint(tmp_path):
    model = build().eval()
    state = decided(model)
    model.apply_pruning(state)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    x = batches()[0][0]
    expected = model(x)
    model.save_tunable(tmp_path / "t.safetensors")
    for apply in (False, True):  # the checkpoint carries the channels; applying the decision first changes nothing
        other = build(seed=1).eval()
        if apply:
            other.apply_pruning(state)
        other.load_tunable(tmp_path / "t.safetensors")
        torch.testing.assert_close(other(x), expected, rtol=0, atol=0)
        assert all(torch.equal(other.channels()[k], v) for k, v in state.items())
    bad = {**state, "blocks.0.attn": torch.zeros(8, dtype=torch.int64)}
    with pytest.raises(ValueError, match="distinct"):
        model.apply_pruning(bad)
    with pytest.raises(ValueError, match="missing"):
        model.apply_pruning({})


def test_bad_k_is_refused_in_one_line(synth_root, tmp_path, capsys):
    for k in (0, -1):
        with pytest.raises(ValueError, match=f"k={k} must be at least 1") as e:
            SCTConfig(k=k)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="k=49 exceeds the backbone's width 48; set k=48"):
        SCTConfig(k=49).check_backbone(tiny_vit())
    results = tmp_path / "r"
    for k, message in (("0", "k=0 must be at least 1"), ("65", "k=65 exceeds the backbone's width 64; set k=64")):
        args = argv(
            f"bench --method sct --tasks camelyon --data-root {synth_root} --results {results}", "--set", f"k={k}"
        )
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not list(results.rglob("*.json"))


def test_bench_decides_once_and_every_run_carries_it(synth_root, tmp_path, capsys):
    results = tmp_path / "results"
    args = argv(f"bench --method sct --tasks camelyon --data-root {synth_root} --results {results}",
                "--epochs", "2", "--batch-size", "32", "--seeds", "42", "--protocol", "grid",
                "--lr-grid", "0.01,0.1", "--wd-grid", "0", "--set", "k=8")  # fmt: skip
    assert main(args) == 0
    task_dir = results / "runs/sct/camelyon"
    decided = {p.name for p in (task_dir / "decisions").iterdir()}
    assert {"grid-prune-candidates.safetensors", "grid-prune-choice.json"} <= decided
    records = [json.loads(p.read_text()) for p in sorted(task_dir.rglob("*.json")) if "decisions" not in p.parts]
    assert len(records) == 3  # two grid points, one final seed
    assert all(r["status"] == "ok" for r in records), [r.get("error") for r in records]
    hashes = {r["config"]["decisions"]["pruning"] for r in records}
    digests = {r["pruning"]["channels_sha256"] for r in records}
    assert len(hashes) == 1 and len(digests) == 1
    assert all(r["pruning"]["k"] == 8 and r["params"]["tunable"] == 6 * (64 + 8) for r in records)
    capsys.readouterr()
    mtimes = {p: p.stat().st_mtime_ns for p in task_dir.rglob("*") if p.is_file()}
    code = main(args)
    captured = capsys.readouterr()
    assert code == 0 and "0 run(s) executed" in captured.out
    assert {p: p.stat().st_mtime_ns for p in task_dir.rglob("*") if p.is_file()} == mtimes
