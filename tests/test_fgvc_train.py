"""Training on FGVC: split roles per suite, VPT's crop/flip preprocessing from a decode-once cache (checked
against torchvision's transforms on the same images), reproducibility per seed, VTAB-1k's path unchanged, and
`bench --suite fgvc` end to end."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from itertools import chain
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

import benchmark.data.cache as cache
from benchmark.cli import main
from benchmark.core.errors import UserError
from benchmark.data.arrays import VTABDataModule, check_cache_space, load_split_images
from benchmark.data.augment import CropFlipDataset, flip_batch, gather_crops
from benchmark.run import runner
from benchmark.run.splits import mode_splits, protocol_splits
from tasks import find_task_dir, get_task, read_split
from tasks.folder import decode_image
from tasks.synth import SynthConfig, write_task
from tasks.synth_fgvc import write_fgvc_task
from tests.conftest import argv

S, R = 24, 27  # crop side and the shorter side it is cut from (floor(24 / 0.875))
FLOWERS = get_task("oxfordflowers")


@pytest.fixture(scope="module")
def fgvc_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fgvc")
    write_fgvc_task(root, FLOWERS, SynthConfig(per_class=1, image_size=S, seed=0))
    return root


def split_of(root: Path, split: str, task=FLOWERS):
    return read_split(find_task_dir(root, task), task, split)


def test_split_roles_come_from_the_suite():
    vtab, fgvc = get_task("dtd"), FLOWERS
    assert mode_splits(vtab, "tune") == ("train800", "val200") and mode_splits(vtab, "final") == (
        "train800val200",
        "test",
    )
    assert protocol_splits(vtab, "grid") == ("train800", "val200", "train800val200", "test")
    assert mode_splits(fgvc, "tune") == ("train", "val") and mode_splits(fgvc, "final") == ("train", "test")
    assert protocol_splits(fgvc, "grid") == ("train", "val", "test")  # train once, for both modes
    assert resize_sides() == {224: 256, 384: 438, 448: 512}


def resize_sides() -> dict[int, int]:
    return {s: cache.resize_side(s) for s in (224, 384, 448)}


def test_evaluation_and_training_caches_match_torchvision(fgvc_root, tmp_path):
    test, train = split_of(fgvc_root, "test"), split_of(fgvc_root, "train")
    evaluated = load_split_images(test, S, cache_dir=tmp_path)
    center = T.Compose([T.Resize(R, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(S)])
    for i in range(0, len(test), 17):
        with Image.open(test.images[i]) as im:
            expected = np.asarray(center(im.convert("RGB"))).transpose(2, 0, 1)
        assert np.array_equal(evaluated.inputs[i], expected), i
    trained = load_split_images(train, S, cache_dir=tmp_path)
    assert trained.index is not None and trained.crop == S
    resize = T.Resize(R, interpolation=T.InterpolationMode.BICUBIC)
    shapes = set()
    for i in range(0, len(train), 13):
        with Image.open(train.images[i]) as im:
            expected = np.asarray(resize(im.convert("RGB"))).transpose(2, 0, 1)
        offset, h, w = trained.index[i]
        assert np.array_equal(trained.inputs[offset : offset + 3 * h * w].reshape(3, h, w), expected), i
        shapes.add((h, w))
    assert len(shapes) > 1 and min(min(s) for s in shapes) == R  # non-square, shorter side R


def test_random_crops_and_flips_follow_torchvision(fgvc_root, tmp_path):
    arrays = load_split_images(split_of(fgvc_root, "train"), S, cache_dir=tmp_path)
    i = int(np.argmax(arrays.index[:, 1] * arrays.index[:, 2]))  # the image with the most crop positions
    offset, h, w = arrays.index[i]
    image = torch.from_numpy(np.array(arrays.inputs[offset : offset + 3 * h * w].reshape(3, h, w)))
    ds = CropFlipDataset(arrays, seed=0)
    draws = CropFlipDataset(arrays, seed=0, resident=True)  # the same draws, as (index, top, left, flip)
    tops, lefts, flips = [], [], []
    for _ in range(150):
        x, y, flip = ds.__getitems__([i])
        _, top, left, same_flip = (int(t[0]) for t in draws.__getitems__([i]))
        assert same_flip == bool(flip[0])
        expected = T.functional.crop(image, top, left, S, S)  # the crop torchvision's RandomCrop cuts at (top, left)
        assert torch.equal(flip_batch(x, flip)[0], expected.flip(-1) if flip[0] else expected)
        assert y[0] == arrays.labels[i]
        tops.append(top), lefts.append(left), flips.append(bool(flip[0]))
    # RandomCrop.get_params draws top in [0, h - S] and left in [0, w - S], every position possible
    assert set(tops) == set(range(h - S + 1)) and set(lefts) == set(range(w - S + 1))
    assert 0.35 < np.mean(flips) < 0.65


def test_resident_crops_equal_host_crops(fgvc_root, tmp_path):
    arrays = load_split_images(split_of(fgvc_root, "train"), S, cache_dir=tmp_path)
    host = CropFlipDataset(arrays, seed=3)
    resident = CropFlipDataset(arrays, seed=3, resident=True)
    flat, index = torch.from_numpy(np.array(arrays.inputs)), torch.from_numpy(arrays.index)
    for batch in ([0, 5, 9, 40], [101, 2, 77]):
        x, _, flips = host.__getitems__(batch)
        gathered = gather_crops(flat, index, S, *resident.__getitems__(batch))
        assert torch.equal(gathered, flip_batch(x, flips))


def epochs_of(dm: VTABDataModule, n: int) -> list[list[torch.Tensor]]:
    loader = dm.train_dataloader()
    return [[dm.on_after_batch_transfer(b, 0)[0] for b in loader] for _ in range(n)]


def test_batches_are_reproducible_per_seed(fgvc_root, tmp_path):
    train = load_split_images(split_of(fgvc_root, "train"), S, cache_dir=tmp_path)
    val = load_split_images(split_of(fgvc_root, "val"), S, cache_dir=tmp_path)
    runs = [epochs_of(VTABDataModule(train, val, batch_size=16, seed=seed), 2) for seed in (1, 1, 2)]
    flat = [list(chain(*r)) for r in runs]
    assert all(torch.equal(a, b) for a, b in zip(flat[0], flat[1], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(flat[0], flat[2], strict=True))
    first, second = runs[0]
    assert not all(torch.equal(a, b) for a, b in zip(first, second, strict=True))  # new crops every epoch
    assert first[0].shape == (16, 3, S, S)


def test_vtab_cache_and_batches_are_unchanged(tmp_path):
    task = get_task("dtd")
    write_task(tmp_path / "data", task, SynthConfig(per_class=1, image_size=20, seed=0))
    split = split_of(tmp_path / "data", "train800", task)
    arrays = load_split_images(split, 16, "bicubic", tmp_path / "cache")
    # The entry's name and key as before suites existed, so caches built earlier are found again.
    h = hashlib.sha256(f"2|{split.path.resolve()}|{split.sha256}|16|bicubic".encode())
    for image in split.images:
        h.update(f"{image.stat().st_size}:{image.stat().st_mtime_ns};".encode())
    (entry,) = (tmp_path / "cache").iterdir()
    assert entry.name == f"dtd-train800-16px-bicubic-{h.hexdigest()[:16]}.npy"
    assert np.array_equal(arrays.inputs, np.stack([decode_image(p, 16) for p in split.images]))
    assert arrays.index is None
    dm = VTABDataModule(arrays, arrays, batch_size=4, seed=0)
    batch = next(iter(dm.train_dataloader()))
    assert len(batch) == 2  # images and labels: no crops, no flips
    x, y = dm.on_after_batch_transfer(batch, 0)
    rows = {bytes(a.tobytes()): int(label) for a, label in zip(arrays.inputs, arrays.labels, strict=True)}
    assert [rows[bytes(a.numpy().tobytes())] for a in batch[0]] == y.tolist() and x.shape == (4, 3, 16, 16)


def test_bench_fgvc_trains_from_the_cache(fgvc_root, tmp_path, monkeypatch):
    decoded: Counter[str] = Counter()
    modules: list[VTABDataModule] = []

    def counting(fn):
        def wrapper(path, *args, **kwargs):
            decoded[Path(path).name] += 1
            return fn(path, *args, **kwargs)

        return wrapper

    class Recording(VTABDataModule):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            modules.append(self)

    monkeypatch.setattr(cache, "decode_shorter", counting(cache.decode_shorter))
    monkeypatch.setattr(cache, "decode_image", counting(cache.decode_image))
    monkeypatch.setattr(runner, "VTABDataModule", Recording)
    results = tmp_path / "r"
    args = argv(f"bench --suite fgvc --method vpt_deep --tasks oxfordflowers --data-root {fgvc_root} "
                "--protocol grid --lr-grid 0.1 --wd-grid 0 --epochs 2 --seeds 42",
                "--cache-dir", str(tmp_path / "cache"))  # fmt: skip
    assert main([*args, "--results", str(results)]) == 0
    files = {s: split_of(fgvc_root, s) for s in ("train", "val", "test")}
    # every image decoded once: train (both modes, two epochs each), val and test
    assert sorted(decoded.values()) == [1] * sum(len(f) for f in files.values())
    run_dir = results / "runs" / "vpt_deep" / "oxfordflowers"
    final = json.loads((run_dir / "grid-s42.json").read_text())
    tune = json.loads((run_dir / "grid-tune" / "lr0.1-wd0.json").read_text())
    for record, (train, evaluated) in ((tune, ("train", "val")), (final, ("train", "test"))):
        assert record["status"] == "ok", record.get("error")
        data = record["data"]
        assert (data["train_split"]["name"], data["eval_split"]["name"]) == (train, evaluated)
        assert data["train_split"]["sha256"] == files[train].sha256
        pre = data["preprocessing"]
        assert pre["train"]["layout"] == "shorter" and pre["eval"]["layout"] == "center"
        assert pre["train"]["resize"] == 36 and pre["train"]["image_size"] == 32  # the tiny backbone's 32 px
        assert record["config"]["preprocessing"] == {"augment": "crop_flip", "resize": 36}
    assert final["test_acc"] is not None and tune["val_acc"] is not None
    trained = modules[-1]
    assert (
        trained.train.crop == 32 and trained.train.index is not None and trained.eval.inputs.shape[1:] == (3, 32, 32)
    )
    # a second sweep in the same process decodes nothing
    decoded.clear()
    assert main([*args, "--results", str(tmp_path / "r2")]) == 0
    assert not decoded


def test_uncropped_entries_are_checked_and_rebuilt(fgvc_root, tmp_path, monkeypatch, capsys):
    train = split_of(fgvc_root, "train")
    index = cache.shorter_index(train, R)
    needed = cache.index_total(index) + cache.NPY_HEADER + 24 * len(train) + cache.NPY_HEADER
    monkeypatch.setattr("benchmark.core.paths.free_bytes", lambda path: needed - 1)
    with pytest.raises(UserError, match=rf"1 split\(s\) \({len(train)} images at {S} px\) needs"):
        check_cache_space([train], S, cache_dir=tmp_path)
    monkeypatch.setattr("benchmark.core.paths.free_bytes", lambda path: needed)
    check_cache_space([train], S, cache_dir=tmp_path)
    good = load_split_images(train, S, cache_dir=tmp_path)
    assert np.array_equal(good.index, index)
    pixels, stored = tmp_path / Path(good.inputs.filename).name, cache.index_path(Path(good.inputs.filename))
    check_cache_space([train], S, cache_dir=tmp_path)  # nothing left to decode
    damaged = index.copy()
    damaged[1, 0] += 3
    np.save(stored, damaged)
    again = load_split_images(train, S, cache_dir=tmp_path)
    assert (
        "index holds an index whose offsets do not follow its image shapes; rebuilding it" in capsys.readouterr().err
    )
    assert np.array_equal(again.index, index) and np.array_equal(again.inputs, good.inputs)
    with open(pixels, "r+b") as f:
        f.truncate(pixels.stat().st_size - 5)
    load_split_images(train, S, cache_dir=tmp_path)
    assert "is truncated" in capsys.readouterr().err


def test_reproduce_plans_vpts_fgvc_protocol(capsys):
    assert main(["reproduce", "--suite", "fgvc", "--method", "vpt_deep", "--plan"]) == 0
    out = capsys.readouterr().out
    assert "on train → val (seed 42), then the best pair with seeds 42, 44, 82, 100, 800 on train → test" in out
    assert "grid points (train → val): 180 runs" in out and "final seeds (train → test): 25 runs" in out
    # VPT's FGVC prompt grid at batch 128: {50, ..., 0.1} × 128/256, four weight decays
    assert re.search(
        r"cub +128 +100 +9×4 +25, 12.5, 5, 2.5, 1.25, 0.5, 0.25, 0.125, 0.05 +0.01, 0.001, 0.0001, 0", out
    )
    # CUB: 36 tuning runs and 5 final runs of 100 epochs on train's 5,394 images
    assert re.search(rf"cub .* {41 * 5394 * 100} +{36 * 600 + 5 * 5794}\n", out)
    for method, lrs in (("linear", 10), ("full", 4)):
        assert main(["reproduce", "--suite", "fgvc", "--method", method, "--plan"]) == 0
        assert re.search(rf"cub +\d+ +\d+ +{lrs}×4 ", capsys.readouterr().out), method


def test_loader_workers_draw_their_own_reproducible_crops(fgvc_root, tmp_path):
    train = load_split_images(split_of(fgvc_root, "train"), S, cache_dir=tmp_path)

    def draws(workers: int) -> list[tuple[torch.Tensor, ...]]:  # (indices, tops, lefts, flips) per batch
        loader = DataLoader(CropFlipDataset(train, 5, resident=True), batch_size=32, shuffle=True, num_workers=workers,
                            generator=torch.Generator().manual_seed(5), collate_fn=lambda b: b)  # fmt: skip
        return list(loader)

    first, again = draws(2), draws(2)
    assert all(torch.equal(a, b) for x, y in zip(first, again, strict=True) for a, b in zip(x, y, strict=True))
    # each worker reseeded from its own seed: batch 0 (worker 0) and batch 1 (worker 1) flip differently
    assert not torch.equal(first[0][3], first[1][3])
