"""Backbone loading, the uint8 image cache, atomic result files and feature caching equivalence."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from benchmark.cli import main
from benchmark.data.arrays import ArrayDataset, SplitArrays, VTABDataModule, load_split_images, scan_task
from benchmark.run.backbone import create_backbone
from benchmark.run.results import atomic_write_bytes
from tasks import get_task
from tests.conftest import argv


def test_local_weights_are_loaded_exactly(tmp_path):
    source = create_backbone("test_vit", pretrained=False, image_size=32)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)  # differ from any fresh initialisation
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = create_backbone("test_vit", weights=path, image_size=32)
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_random_backbone_is_reproducible_and_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    a = create_backbone("test_vit", pretrained=False, image_size=32)
    assert torch.equal(torch.rand(3), expected)
    b = create_backbone("test_vit", pretrained=False, image_size=32)
    c = create_backbone("test_vit", pretrained=False, image_size=32, init_seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.pos_embed, c.pos_embed)


def test_backbone_is_headless_with_zero_stochastic_rates():
    vit = create_backbone("test_vit", pretrained=False, image_size=32)
    assert isinstance(vit.head, torch.nn.Identity) and vit.num_classes == 0
    assert vit.patch_embed.img_size == (32, 32)
    assert all(not isinstance(m, torch.nn.Dropout) or m.p == 0 for m in vit.modules())


def test_image_cache_decodes_once(synth_root, tmp_path):
    data = scan_task(synth_root, get_task("camelyon"), ("train800",))
    split = data.splits["train800"]
    first = load_split_images(split, 16, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.npy"))
    assert len(files) == 1 and first.inputs.shape == (32, 3, 16, 16) and first.inputs.dtype == np.uint8
    mtime = files[0].stat().st_mtime_ns
    again = load_split_images(split, 16, cache_dir=tmp_path)
    assert files[0].stat().st_mtime_ns == mtime and np.array_equal(first.inputs, again.inputs)
    assert again.labels.tolist() == list(split.labels)
    load_split_images(split, 16, "bilinear", cache_dir=tmp_path)  # other preprocessing, other entry
    assert len(list(tmp_path.glob("*.npy"))) == 2 and not list(tmp_path.glob(".*"))


def test_datamodule_serves_uint8_and_normalises_on_device():
    arrays = SplitArrays("x", np.full((6, 3, 4, 4), 255, dtype=np.uint8), np.arange(6))
    dm = VTABDataModule(arrays, arrays, batch_size=4, seed=0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 4, 4) and y.shape == (4,)
    x, y = dm.on_after_batch_transfer((x, y), 0)
    assert x.dtype == torch.float32 and torch.allclose(x, torch.full_like(x, 2.0))
    order = [next(iter(VTABDataModule(arrays, arrays, batch_size=6, seed=s).train_dataloader()))[1] for s in (1, 1, 2)]
    assert torch.equal(order[0], order[1]) and not torch.equal(order[0], order[2])
    assert ArrayDataset(arrays)[3][1].tolist() == [3]


def test_atomic_write_leaves_identical_files_untouched(tmp_path):
    path = tmp_path / "a" / "b.json"
    assert atomic_write_bytes(path, b"one") and path.read_bytes() == b"one"
    mtime = path.stat().st_mtime_ns
    assert not atomic_write_bytes(path, b"one") and path.stat().st_mtime_ns == mtime
    assert atomic_write_bytes(path, b"two") and path.read_bytes() == b"two"
    assert [p.name for p in path.parent.iterdir()] == ["b.json"]


@pytest.mark.slow
def test_linear_on_cached_features_trains_like_end_to_end(synth_root, tmp_path):
    """Same seed, same batch order: the cached-feature path and the end-to-end path give the same run."""
    runs = {}
    for name, extra in (("cached", []), ("e2e", ["--no-feature-cache"])):
        out = tmp_path / f"{name}.json"
        code = main(
            argv(
                f"run --method linear --task svhn --data-root {synth_root} --out {out} --epochs 3 --batch-size 16",
                *extra,
            )
        )
        assert code == 0
        runs[name] = json.loads(out.read_text())
    assert runs["cached"]["config"]["cache_features"] and not runs["e2e"]["config"]["cache_features"]
    np.testing.assert_allclose(runs["cached"]["train_loss"], runs["e2e"]["train_loss"], rtol=1e-4, atol=1e-5)
    assert runs["cached"]["test_acc"] == pytest.approx(runs["e2e"]["test_acc"], abs=1.0)


def test_synth_command(tmp_path, capsys):
    assert (
        main(["synth", "--out", str(tmp_path), "--tasks", "dtd,kitti", "--per-class", "2", "--image-size", "8"]) == 0
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dtd", "kitti"]
    assert len((tmp_path / "dtd" / "train800.txt").read_text().splitlines()) == 2 * 47
    assert main(["synth", "--out", str(tmp_path), "--tasks", "dtd", "--per-class", "0"]) == 2
    assert "must be a positive integer" in capsys.readouterr().err
