"""`--weights` that do not fit the backbone, or cannot be read, are refused in one line; fitting ones load exactly."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from benchmark.cli import main
from benchmark.core.errors import UserError
from benchmark.run.backbone import DEMO_BACKBONE, create_backbone
from tests.test_cli import snapshot

SIZE = 32  # the image size the tests run at; test_vit's own is 160


def _vit(seed: int = 1, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_vit", pretrained=False, **{"num_classes": 0, "img_size": SIZE, **kwargs})


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def _google_npz(model: torch.nn.Module, path: Path) -> Path:
    """`model` in the layout of Google's ViT `.npz` checkpoints (`ViT-B_16.npz`), as timm reads it back."""

    def t(x: torch.Tensor) -> np.ndarray:
        return x.detach().numpy()

    w = {
        "embedding/kernel": t(model.patch_embed.proj.weight.permute(2, 3, 1, 0)),
        "embedding/bias": t(model.patch_embed.proj.bias),
        "cls": t(model.cls_token),
        "Transformer/posembed_input/pos_embedding": t(model.pos_embed),
        "Transformer/encoder_norm/scale": t(model.norm.weight),
        "Transformer/encoder_norm/bias": t(model.norm.bias),
    }
    for i, block in enumerate(model.blocks):
        p = f"Transformer/encoderblock_{i}/"
        q, k, v = block.attn.qkv.weight.chunk(3)
        qb, kb, vb = block.attn.qkv.bias.chunk(3)
        for name, weight, bias in (("query", q, qb), ("key", k, kb), ("value", v, vb)):
            w[f"{p}MultiHeadDotProductAttention_1/{name}/kernel"] = t(weight.T)
            w[f"{p}MultiHeadDotProductAttention_1/{name}/bias"] = t(bias)
        w[f"{p}MultiHeadDotProductAttention_1/out/kernel"] = t(block.attn.proj.weight.T)
        w[f"{p}MultiHeadDotProductAttention_1/out/bias"] = t(block.attn.proj.bias)
        for ln, norm in (("LayerNorm_0", block.norm1), ("LayerNorm_2", block.norm2)):
            w[f"{p}{ln}/scale"], w[f"{p}{ln}/bias"] = t(norm.weight), t(norm.bias)
        for r, fc in enumerate((block.mlp.fc1, block.mlp.fc2)):
            w[f"{p}MlpBlock_3/Dense_{r}/kernel"], w[f"{p}MlpBlock_3/Dense_{r}/bias"] = t(fc.weight.T), t(fc.bias)
    np.savez(path, **w)
    return path


def _same(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    loaded = model.state_dict()
    return loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


# -- checkpoints that fit load exactly ------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_the_backbones_own_checkpoint_loads_exactly(tmp_path, suffix):
    state = _state(_vit())
    model = create_backbone("test_vit", weights=_save(state, tmp_path / f"w{suffix}"), image_size=SIZE)
    assert _same(model, state)


def test_a_classifier_head_and_wrapper_prefixes_of_ddp_and_compile_are_accepted(tmp_path):
    """The head is dropped; `module.` (DDP) and `_orig_mod.` (torch.compile) are stripped, as timm does."""
    with_head = _state(_vit(num_classes=7))
    assert {"head.weight", "head.bias"} <= with_head.keys()
    headless = {k: v for k, v in with_head.items() if not k.startswith("head.")}
    model = create_backbone("test_vit", weights=_save(with_head, tmp_path / "head.safetensors"), image_size=SIZE)
    assert _same(model, headless)
    wrapped = {f"module._orig_mod.{k}": v for k, v in headless.items()}
    model = create_backbone("test_vit", weights=_save(wrapped, tmp_path / "ddp.pth"), image_size=SIZE)
    assert _same(model, headless)
    torch.save({"epoch": 3, "state_dict": headless}, tmp_path / "training.pth")  # a training checkpoint
    assert _same(create_backbone("test_vit", weights=tmp_path / "training.pth", image_size=SIZE), headless)


def test_position_embeddings_are_resampled_to_another_image_size(tmp_path):
    state = _state(_vit(img_size=160))  # a 10x10 grid of 16-px patches
    model = create_backbone("test_vit", weights=_save(state, tmp_path / "w.safetensors"), image_size=SIZE)
    assert model.pos_embed.shape == (1, 1 + 2 * 2, 64)
    assert torch.equal(model.pos_embed[:, 0], state["pos_embed"][:, 0])  # the class token's is kept as is
    assert torch.equal(model.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])


def test_googles_npz_layout_loads_exactly_and_at_another_size(tmp_path):
    source = _vit()
    path = _google_npz(source, tmp_path / "ViT.npz")
    assert _same(create_backbone("test_vit", weights=path, image_size=SIZE), _state(source))
    resized = create_backbone("test_vit", weights=path, image_size=64)
    assert resized.pos_embed.shape == (1, 1 + 4 * 4, 64)
    assert torch.equal(resized.blocks[5].mlp.fc2.weight, source.blocks[5].mlp.fc2.weight)


def test_the_demo_backbones_pretrained_file_still_loads(tmp_path):
    """What `python -m benchmark pretrain-demo` writes (the backbone's state_dict as safetensors) is what
    `make demo` passes as `--backbone peft_bench_demo_vit --weights FILE`."""
    from timm.models.vision_transformer import _create_vision_transformer

    from benchmark.run.backbone import DEMO_VIT_ARGS

    torch.manual_seed(5)
    trained = _create_vision_transformer(DEMO_BACKBONE, pretrained=False, num_classes=0, **DEMO_VIT_ARGS)
    state = _state(trained)
    path = tmp_path / "peft_bench_demo_vit.safetensors"
    save_file(state, str(path), metadata={"architecture": DEMO_BACKBONE})
    assert _same(create_backbone(DEMO_BACKBONE, weights=path), state)


# -- checkpoints that do not fit, or cannot be read: one line, exit 2, nothing written -----------------------
def _bad_weights(tmp_path: Path, case: str) -> Path:
    state = _state(_vit())
    match case:
        case "shallower model":
            return _save(_state(_vit(depth=3)), tmp_path / "shallow.safetensors")
        case "deeper model":
            return _save(_state(_vit(depth=8)), tmp_path / "deep.safetensors")
        case "narrower model":
            return _save(_state(_vit(embed_dim=32, num_heads=2)), tmp_path / "narrow.safetensors")
        case "another architecture":
            return _save(_state(timm.create_model("resnet18", num_classes=0)), tmp_path / "resnet.pth")
        case "half the keys":
            half = dict(list(state.items())[::2])
            return _save(half, tmp_path / "half.safetensors")
        case "model. prefix":
            return _save({f"model.{k}": v for k, v in state.items()}, tmp_path / "lightning.pth")
        case "truncated safetensors":
            good = _save(state, tmp_path / "good.safetensors").read_bytes()
            (tmp_path / "cut.safetensors").write_bytes(good[: len(good) // 2])
            return tmp_path / "cut.safetensors"
        case "garbage safetensors":
            (tmp_path / "garbage.safetensors").write_bytes(b"\x13\x00\x00\x00\x00\x00\x00\x00{not json}" * 20)
            return tmp_path / "garbage.safetensors"
        case "truncated pth":
            good = _save(state, tmp_path / "good.pth").read_bytes()
            (tmp_path / "cut.pth").write_bytes(good[: len(good) // 2])
            return tmp_path / "cut.pth"
        case "garbage pth":
            (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all" * 30)
            return tmp_path / "garbage.pth"
        case "truncated npz":
            good = _google_npz(_vit(), tmp_path / "good.npz").read_bytes()
            (tmp_path / "cut.npz").write_bytes(good[: len(good) // 2])
            return tmp_path / "cut.npz"
        case "garbage npz":
            (tmp_path / "garbage.npz").write_bytes(b"PK\x03\x04" + b"\x00" * 200)
            return tmp_path / "garbage.npz"
        case "deeper npz":
            return _google_npz(_vit(depth=8), tmp_path / "deep.npz")
        case "shallower npz":
            return _google_npz(_vit(depth=3), tmp_path / "shallow.npz")
        case "narrower npz":
            return _google_npz(_vit(embed_dim=32, num_heads=2), tmp_path / "narrow.npz")
    raise AssertionError(case)


DOES_NOT_FIT = r"does not fit backbone test_vit: "
ADVICE = r"pass the checkpoint of this backbone, or the --backbone it was saved from$"
CANNOT_READ = r"cannot read weights file .*; pass a complete "
BAD_WEIGHTS = {
    "shallower model": DOES_NOT_FIT + r"36 of the backbone's 78 tensors are missing \(blocks\.3\.norm1\.weight, "
    r"blocks\.3\.norm1\.bias, blocks\.3\.attn\.qkv\.weight, \.\.\. \(36 in all\)\); " + ADVICE,
    "deeper model": DOES_NOT_FIT + r"24 are not in the backbone \(blocks\.6\.[^)]*\(24 in all\)\); " + ADVICE,
    "narrower model": DOES_NOT_FIT + r"78 have other shapes \(blocks\.0\.attn\.proj\.bias \[32\] vs \[64\], "
    r"blocks\.0\.attn\.proj\.weight \[32, 32\] vs \[64, 64\], \.\.\. \(78 in all\)\); " + ADVICE,
    "another architecture": DOES_NOT_FIT + r"78 of the backbone's 78 tensors are missing \(cls_token, pos_embed, "
    r"patch_embed\.proj\.weight, \.\.\. \(78 in all\)\); \d+ are not in the backbone \(conv1\.weight, .*; " + ADVICE,
    "half the keys": DOES_NOT_FIT + r"39 of the backbone's 78 tensors are missing \(pos_embed, .*; " + ADVICE,
    "model. prefix": DOES_NOT_FIT + r"78 of the backbone's 78 tensors are missing .*; 78 are not in the backbone "
    r"\(model\.cls_token, .* \(its keys carry the prefix 'model\.': save the backbone's own state_dict, "
    r"without the wrapper\); " + ADVICE,
    "truncated safetensors": CANNOT_READ + r"\.safetensors, \.pth/\.bin or \.npz checkpoint$",
    "garbage safetensors": CANNOT_READ + r"\.safetensors, \.pth/\.bin or \.npz checkpoint$",
    "truncated pth": CANNOT_READ + r"\.safetensors, \.pth/\.bin or \.npz checkpoint$",
    "garbage pth": CANNOT_READ + r"\.safetensors, \.pth/\.bin or \.npz checkpoint$",
    "truncated npz": CANNOT_READ + r"\.npz checkpoint$",
    "garbage npz": CANNOT_READ + r"\.npz checkpoint$",
    "deeper npz": DOES_NOT_FIT + r"it holds 8 transformer blocks, the backbone has 6; " + ADVICE,
    "shallower npz": DOES_NOT_FIT + r"it holds 3 transformer blocks, the backbone has 6; " + ADVICE,
    "narrower npz": r"does not fit backbone test_vit \(RuntimeError: ",
}


@pytest.mark.parametrize("case", list(BAD_WEIGHTS))
def test_weights_that_do_not_fit_or_cannot_be_read_are_refused_in_one_line(case, tmp_path):
    with pytest.raises(UserError) as e:
        create_backbone("test_vit", weights=_bad_weights(tmp_path, case), image_size=SIZE)
    message = str(e.value)
    assert "\n" not in message and re.search(BAD_WEIGHTS[case], message), message


CLI_CASES = ["shallower model", "half the keys", "model. prefix", "truncated safetensors", "garbage npz"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_the_run_command_refuses_bad_weights_with_exit_2_and_writes_nothing(case, synth_root, tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    (results / "keep.txt").write_text("untouched")
    before = snapshot(results)
    weights = _bad_weights(tmp_path, case)
    args = ["run", "--method", "linear", "--task", "camelyon", "--data-root", str(synth_root)]
    args += ["--results", str(results), "--backbone", "test_vit", "--weights", str(weights)]
    args += ["--image-size", str(SIZE), "--epochs", "1", "--quiet"]
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: ") and re.search(BAD_WEIGHTS[case], err), err
    assert snapshot(results) == before


@pytest.mark.slow
def test_truncated_weights_through_the_real_entry_point(synth_root, tmp_path):
    """`python -m benchmark run ... --weights cut.safetensors`: exit 2, one line on stderr, no traceback."""
    weights = _bad_weights(tmp_path, "truncated safetensors")
    out = subprocess.run(
        [sys.executable, "-m", "benchmark", "run", "--method", "linear", "--task", "camelyon", "--data-root",
         str(synth_root), "--results", str(tmp_path / "results"), "--backbone", "test_vit", "--weights",
         str(weights), "--image-size", str(SIZE), "--epochs", "1", "--quiet"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and re.search(CANNOT_READ, out.stderr), out.stderr
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("*.json"))
