"""Convpass and PGN against their specs: module shapes and counts, the conv's view of the grid, the CLS
path, schedules, the generator, the mixture, prompt placement and input-space deployment."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from benchmark.cli import main
from benchmark.run.backbone import create_backbone
from methods import Recipe
from methods._inject import ParallelBranches
from methods.convpass import Convpass, ConvpassAttnConfig, ConvpassConfig
from methods.pgn import PGNConfig, PGNModel, PromptGenerator, generator_body_params, load_input_space
from tasks import TASKS
from tests.conftest import argv, tiny_vit

C = 5


def images(batch: int = 3, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def randomised(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return module.eval()


# -- Convpass ------------------------------------------------------------------------------------------------
def test_folded_scale_and_drop_path_equal_the_written_formula():
    """Scale and drop-path folded into the bypass's projection give the block formula's numbers, draw for draw."""
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, drop_path_rate=0.5)
    block = vit.blocks[1]  # drop-path rate 0.5 (the first block's is 0)
    attn_b, mlp_b = (randomised(Convpass(48, (4, 4), 8, xavier=True)) for _ in range(2))
    wrapped = ParallelBranches(block, attn_branch=attn_b, mlp_branch=mlp_b, scale=3.0).train()
    x = torch.randn(6, 17, 48)
    for m in (attn_b, mlp_b):
        m.dropout.p = 0.3
    torch.manual_seed(7)
    folded = wrapped(x)
    torch.manual_seed(7)
    b = block
    out = x + b.drop_path1(b.ls1(b.attn(b.norm1(x)))) + 3.0 * b.drop_path1(attn_b(b.norm1(x)))
    out = out + b.drop_path2(b.ls2(b.mlp(b.norm2(out)))) + 3.0 * b.drop_path2(mlp_b(b.norm2(out)))
    torch.testing.assert_close(folded, out)
    torch.manual_seed(8)
    assert not torch.allclose(wrapped(x), folded)  # the draws matter: the comparison is not vacuous


def test_one_module_has_13648_parameters_at_width_768():
    module = Convpass(768, (14, 14), 8, xavier=True)
    assert sum(p.numel() for p in module.parameters()) == 13_648
    assert module.up.weight.abs().sum() == 0 and module.up.bias.abs().sum() == 0


def test_conv_sees_the_patch_grid_in_row_major_order():
    grid = (5, 6)
    module = randomised(Convpass(16, grid, 4, xavier=True))
    tokens = torch.randn(2, 1 + 30, 16)
    patches = tokens[:, 1:].reshape(2, *grid, 16)
    shifted = torch.cat([tokens[:, :1], torch.roll(patches, shifts=1, dims=2).reshape(2, 30, 16)], dim=1)
    out = module(tokens)[:, 1:].reshape(2, *grid, 16)
    out_shifted = module(shifted)[:, 1:].reshape(2, *grid, 16)
    # Moving the input one column right moves the response one column right, away from the borders.
    torch.testing.assert_close(out_shifted[:, :, 2:-1], out[:, :, 1:-2])
    # A vertical shift is not a horizontal one: the grid is read row by row.
    down = torch.cat([tokens[:, :1], torch.roll(patches, shifts=1, dims=1).reshape(2, 30, 16)], dim=1)
    assert not torch.allclose(module(down)[:, 1:].reshape(2, *grid, 16)[:, :, 2:-1], out[:, :, 1:-2])


def test_cls_path_uses_only_the_kernel_centre_tap():
    module = randomised(Convpass(16, (4, 4), 4, xavier=True))
    tokens = torch.randn(2, 17, 16)
    expected = module(tokens)[:, 0]
    with torch.no_grad():
        centre = module.conv.weight[:, :, 1, 1].clone()
        module.conv.weight.normal_()
        module.conv.weight[:, :, 1, 1] = centre
    torch.testing.assert_close(module(tokens)[:, 0], expected)
    assert not torch.allclose(module(tokens)[:, 1:], module(tokens)[:, 1:] * 0)


def test_identity_conv_init_maps_its_input_to_itself():
    module = Convpass(16, (4, 4), 8, xavier=False)
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(module.conv(x), x)
    assert Convpass(16, (4, 4), 8, xavier=True).conv.weight[:, :, 0, 0].abs().sum() > 0


@pytest.mark.parametrize("config", [ConvpassConfig(), ConvpassAttnConfig()])
def test_placement_and_identity_at_init_with_drop_path_off_in_eval(config):
    backbone = create_backbone("test_vit", pretrained=False, image_size=32, **config.backbone_kwargs())
    assert backbone.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    torch.manual_seed(0)
    model = config.build(copy.deepcopy(backbone), C).eval()
    assert all(isinstance(b, ParallelBranches) for b in model.backbone.blocks)
    assert all((b.mlp_branch is not None) == config.mlp_side for b in model.backbone.blocks)
    reference = copy.deepcopy(backbone).eval()
    expected = model.forward_head(reference.forward_head(reference.forward_features(images()), pre_logits=True))
    torch.testing.assert_close(model(images()), expected, rtol=1e-5, atol=1e-6)


def test_branches_are_scaled_and_sit_beside_both_sub_blocks():
    vit = tiny_vit().eval()
    model = ConvpassConfig(scale=10.0).build(copy.deepcopy(vit), C).eval()
    with torch.no_grad():
        for block in model.backbone.blocks:
            block.mlp_branch.up.bias.fill_(1.0)  # the MLP-side bypass now adds 10·1 to every token
    tokens = torch.randn(2, 17, 48)
    wrapped, block = model.backbone.blocks[0], vit.blocks[0]
    expected = block(tokens) + 10.0
    torch.testing.assert_close(wrapped(tokens), expected, rtol=1e-5, atol=1e-5)


def test_convpass_schedule_reproduces_the_official_per_epoch_lrs():
    r = ConvpassConfig().recipe
    assert (r.optimizer, r.lr, r.weight_decay, r.batch_size, r.drop_last) == ("adamw", 1e-3, 1e-4, 64, True)
    expected = {0: 1.0e-6, 1: 1.0e-6, 2: 1.009e-4, 10: 9.001e-4, 11: 9.758e-4, 50: 5.206e-4, 99: 1.098e-5}
    for epoch, lr in expected.items():
        assert r.lr_at(epoch) == pytest.approx(lr, rel=1e-3), epoch
    assert max(r.lr_at(e) for e in range(100)) < 1e-3  # the peak is never used
    assert Recipe(schedule="cosine", lr=1e-3, warmup_epochs=10).lr_at(10) == pytest.approx(1e-3)


def test_convpass_decays_every_trainable_tensor_and_uses_per_task_settings():
    model = ConvpassConfig().build(tiny_vit(), C)
    assert model.no_weight_decay_parameters() == []
    assert (ConvpassConfig().for_task("svhn").scale, ConvpassConfig().for_task("cifar100").xavier_init) == (
        100.0,
        False,
    )
    assert ConvpassAttnConfig().for_task("caltech101").scale == 100.0


# -- PGN -----------------------------------------------------------------------------------------------------
def test_generator_shapes_and_body_parameters():
    gen = PromptGenerator(16 * 128).eval()
    x = torch.randn(2, 3, 224, 224)
    assert gen.stem(x).shape == (2, 16, 56, 56)
    assert gen.features(x).shape == (2, 128, 7, 7)
    assert gen(x).shape == (2, 16 * 128)
    body = sum(p.numel() for m in (gen.stem, gen.blocks) for p in m.parameters())
    assert body == generator_body_params() == 307_312
    shortcuts = [b.downsample for b in gen.blocks if b.downsample is not None]
    assert len(shortcuts) == 3 and all(s.bias is not None for s in shortcuts)


def build_pgn(seed: int = 0, **kw) -> PGNModel:
    torch.manual_seed(seed)
    return PGNConfig(num_prompts=4, library_size=6, **kw).build(tiny_vit(), C)


def test_mixture_is_convex_and_prompts_are_library_mixtures():
    model = build_pgn().eval()
    weights = model.pgn.mixture(images())
    assert weights.shape == (3, 4, 6) and (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 4))
    torch.testing.assert_close(model.pgn(images()), weights @ model.pgn.library)
    library_std = model.pgn.library.std().item()
    assert 0.015 < library_std < 0.025  # N(0, 0.02²)


def test_prompts_are_appended_after_the_patches_without_position_embedding():
    model = build_pgn().eval()
    seen = {}
    model.backbone.blocks[0].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    x = images()
    model(x)
    vit = model.backbone
    tokens = seen["x"]
    plain = vit._pos_embed(vit.patch_embed(x))
    assert tokens.shape[1] == plain.shape[1] + 4
    torch.testing.assert_close(tokens[:, : plain.shape[1]], plain)  # CLS first, patches unchanged
    torch.testing.assert_close(tokens[:, plain.shape[1] :], model.pgn(x))


def test_generator_batch_norm_follows_train_and_eval():
    model = build_pgn()
    bn = model.pgn.generator.stem[1]
    assert model.training and bn.training
    before = bn.running_mean.clone()
    model(images())
    assert not torch.equal(bn.running_mean, before)
    model.eval()
    frozen = bn.running_mean.clone()
    model(images())
    assert torch.equal(bn.running_mean, frozen)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-4), (torch.float64, 1e-8)])
def test_input_space_deployment_gives_the_latent_logits(dtype, tol):
    model = build_pgn().to(dtype).eval()
    with torch.no_grad():
        model.pgn.library.normal_()  # a trained-looking library, far from its small init
    x = images().to(dtype)
    latent = model(x)
    report = model.to_input_space()
    assert model.pgn.library.shape == (6, 3 * 8 * 8) and report["max_residual"] < 1e-10
    deployed = model(x)
    assert (deployed - latent).abs().max().item() <= tol


def test_deployed_pgn_exports_and_imports(tmp_path):
    model = build_pgn().eval()
    x = images()
    latent = model(x)
    model.to_input_space()
    path = tmp_path / "pgn-input-space.safetensors"
    model.export_input_space(path)
    restored = load_input_space(path, tiny_vit(), C).eval()
    assert restored.input_space and restored.pgn.library.shape == (6, 192)
    torch.testing.assert_close(restored(x), latent, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="to_input_space"):
        build_pgn().export_input_space(path)


def test_pgn_recipe():
    r = PGNConfig().recipe
    assert (r.optimizer, r.lr, r.weight_decay, r.momentum, r.warmup_epochs, r.epochs) == (
        "sgd",
        0.1,
        0.0,
        0.9,
        50,
        100,
    )
    assert r.lr_at(0) == 0.0 and r.lr_at(50) == pytest.approx(0.1)
    assert r.lr_at(100) == pytest.approx(0.001) and r.lr_at(99) == pytest.approx(0.001, rel=0.1)  # lr/100 at epoch 100


# -- counts and end to end ---------------------------------------------------------------------------------------
def test_params_on_vit_b16_for_every_task(capsys):
    assert (
        main(["params", "--backbone", "vit_base_patch16_224", "--methods", "convpass,convpass_attn,pgn", "--json"])
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    expected = {"convpass": 327_552, "convpass_attn": 163_776, "pgn": 669_808}
    assert len(rows) == 3 * len(TASKS)
    for r in rows:
        assert r["tunable"] == r["nonzero_tunable"] == expected[r["method"]], r


@pytest.mark.slow
@pytest.mark.parametrize("method", ["convpass", "convpass_attn", "pgn"])
def test_bench_on_two_synthetic_tasks(method, synth_root, tmp_path):
    results = tmp_path / "results"
    assert main(argv(f"bench --method {method} --tasks camelyon,svhn --data-root {synth_root} --results {results}",
                     "--epochs", "3", "--batch-size", "16", "--seeds", "42")) == 0  # fmt: skip
    records = [json.loads(p.read_text()) for p in sorted((results / "runs").rglob("*.json"))]
    assert [r["status"] for r in records] == ["ok", "ok"], [r["error"] for r in records]
    assert (results / "leaderboard.md").is_file() and (results / "accuracy_vs_params.png").is_file()
