"""`python -m benchmark perf` (shape of its output only: no timing assertions) and the speed features it
measures: fused attention everywhere, the explicit-attention switch, no host synchronisation in the
training step, splits kept on the device, the sweep prediction's arithmetic.

Cost: the per-method checks share one tiny build per method (`test_method_speed_features`), and `perf` itself runs
over every method once (`test_perf_json_reports_every_method_and_the_sweep`), so the file grows by about one build
and one perf row per registered method."""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from benchmark.cli import main
from benchmark.data.arrays import SplitArrays, VTABDataModule
from benchmark.perf import estimate as perf_sweep
from benchmark.perf import report as perf_report
from benchmark.perf import timing as perf_timing
from benchmark.run.module import ClassificationModule
from methods import get_method, list_methods
from tasks import TASKS, get_task
from tests.conftest import tiny_vit

PERF_TINY = ["--backbone", "test_vit", "--image-size", "32", "--quiet", "--warmup", "1", "--repeats", "1"]
PERF_TINY += ["--eval-repeats", "1", "--eval-batch-size", "8"]


@pytest.fixture
def frozen_heap():
    """The objects alive before the test (the suite's imports, earlier tests' leftovers) are frozen out of the
    garbage collector's view for its duration: `perf` collects garbage before each phase it measures, and each
    collection would walk every one of them again (about a second each in a test process, over 50 per report)."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


def tiny_model(name: str, task: str = "cifar100"):
    t = get_task(task)
    return get_method(name).tiny().for_task(t.id).build(tiny_vit(), t.num_classes), t


def test_perf_json_reports_every_method_and_the_sweep(tmp_path, capsys, frozen_heap, monkeypatch):
    # Profiling a missed target costs seconds per method (the profiler's own bookkeeping), and on the tiny backbone
    # nearly every target is missed: one target that cannot be met and one that cannot be missed exercise the code.
    monkeypatch.setattr(perf_report, "FLOOR_TARGETS", {"lora": 1e-3, "full": 1e6})
    # svhn: 10 classes, so the synthetic task whose decoding the sweep's prediction times is small.
    code = main(["perf", *PERF_TINY, "--task", "svhn", "--sweep", "--out", str(tmp_path), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    methods = list_methods()
    assert [r["method"] for r in report["rows"]] == methods
    # Every registered method is timed on the tiny backbone (an untimed one says why in its note).
    assert {r["method"]: r["note"] for r in report["rows"] if r["step_ms"] is None} == {}
    floors = {f["tokens"] for f in report["floors"]}
    for row in report["rows"]:
        # A method with a pruning or selection stage is timed as built, before the task's decision, and says so.
        assert ("timed as built" in (row["note"] or "")) == get_method(row["method"])().prunes, row["method"]
        assert row["tokens"] in floors
        assert row["step_ms"] > 0 and row["images_per_s"] > 0 and row["eval_images_per_s"] > 0
        assert row["x_floor"] == pytest.approx(row["step_ms"] / row["floor_ms"], rel=1e-2)
        assert row["target_x_floor"] == perf_report.FLOOR_TARGETS.get(row["method"])
        assert (row["meets_target"] is None) == (row["target_x_floor"] is None)
        assert row["peak_memory_mb"] is not None
        assert len(row["step_ms_all"]) == 1
        if row["meets_target"] is False:
            assert row["hot_spots"]  # a missed target names its hot spots
        else:
            assert "hot_spots" not in row
    assert [r["method"] for r in report["rows"] if r["meets_target"] is False] == ["lora"]
    full = next(r for r in report["rows"] if r["method"] == "full")
    assert full["x_full"] == 1.0 and full["memory_x_full"] == 1.0
    # Merged models (plain timm ViTs) beside the frozen backbone; the non-mergeable have none.
    merged = {r["method"]: r["merged_eval_images_per_s"] for r in report["rows"]}
    assert all(merged[m] > 0 for m in methods if m.startswith("peft") or m in ("linear", "full"))
    assert merged["convpass"] is None and merged["vpt_deep"] is None
    assert report["frozen_eval_images_per_s"]["fp32/fused"] > 0
    # Every frozen-feature method (by its model's `features_frozen`, noted in its row) is also timed as its head
    # on cached features, and its sweep prediction uses that.
    feature_tasks = {t["method"]: t for t in report["frozen_feature_tasks"]}
    noted = {r["method"] for r in report["rows"] if "frozen features" in (r["note"] or "")}
    assert set(feature_tasks) == noted and "linear" in noted
    assert feature_tasks["linear"]["epochs"] == 100 and feature_tasks["linear"]["head_images_per_s"] > 0
    sweep = {s["method"]: s for s in report["sweep"]}
    assert list(sweep) == methods
    for name, s in sweep.items():
        assert s["ours_s"] == pytest.approx(s["ours_decode_s"] + s["ours_train_s"] + s["ours_eval_s"], rel=1e-3)
        assert s["speedup"] > 0
        assert ("decision stage" in (s["note"] or "")) == get_method(name)().prunes, name
    assert sweep["linear"]["ours_train_s"] == pytest.approx(
        19 * 100 * 1000 / feature_tasks["linear"]["head_images_per_s"], rel=0.01
    )  # the head alone on cached features: 100 epochs of 1,000 images per task
    # VPT-deep's per-task prompt lengths (1 to 200) give several token counts; the linear probe one.
    assert len(sweep["vpt_deep"]["tokens"]) > 3 and len(sweep["linear"]["tokens"]) == 1
    md = (tmp_path / f"{perf_report.report_stem(report)}.md").read_text()
    assert "× floor" in md and "Predicted 19-task" in md
    assert json.loads((tmp_path / f"{perf_report.report_stem(report)}.json").read_text())["rows"] == report["rows"]


def test_perf_table_and_variants(tmp_path, capsys, frozen_heap, monkeypatch):
    # A method that fails to build, and one whose defaults are refused, each get a row saying why in one line
    # (in every variant); the others are timed as usual.
    def broken(self, backbone, num_classes):
        raise RuntimeError("cannot attach\nsecond line")

    def refused(self):
        raise ValueError("rank=0 is not positive; set rank=8")

    monkeypatch.setattr(get_method("lora"), "create", broken)
    monkeypatch.setattr(perf_report, "FLOOR_TARGETS", {})  # no profiling of missed targets (the test above does)
    monkeypatch.setattr(get_method("bitfit"), "__post_init__", refused)
    code = main(["perf", *PERF_TINY, "--methods", "vpt_deep,lora,bitfit,full", "--attention", "fused,explicit",
                 "--out", str(tmp_path)])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "fp32/fused" in out and "fp32/explicit" in out and "written:" in out
    lines = out.splitlines()
    lora = [line for line in lines if line.startswith("| lora ")]
    bitfit = [line for line in lines if line.startswith("| bitfit ")]
    assert len(lora) == 2 and all("untimed: RuntimeError: cannot attach " in line for line in lora)
    assert not any("second line" in line for line in lora)  # one line
    assert len(bitfit) == 2 and all("untimed: its default config is refused: ValueError: rank=0" in x for x in bitfit)
    assert "Untimed: 4 of 8 rows" in out
    timed = [line for line in lines if line.startswith(("| vpt_deep ", "| full "))]
    assert len(timed) == 4 and not any("untimed" in line for line in timed)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--methods", "nope"], "unknown method"),
        (["--precision", "fp16"], "--precision takes 32 and/or bf16"),
        (["--attention", "flash"], "--attention fused and/or explicit"),
        (["--task", "imagenet"], "unknown task"),
        (["--task", "natural"], "names 7 tasks, this command takes one"),
        (["--backbone", "resnet50"], "resnet50"),
    ],
)
def test_perf_bad_input_is_one_line(extra, message, tmp_path, capsys):
    assert main(["perf", *PERF_TINY, "--out", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err.lower() or message in err
    assert len(err.splitlines()) == 1 and not list(tmp_path.iterdir())


def test_predict_sweep_arithmetic():
    task = TASKS[0]
    costs = perf_sweep.SweepCosts(
        step_ms=100.0, step_ms_fp32=200.0, batch_size=10, tokens=197, eval_ips=50.0, eval_ips_official=25.0,
        decode_ips=1000.0, floor_ms={197: 10.0, 297: 20.0}, floor_ms_fp32={197: 10.0, 297: 30.0},
    )  # fmt: skip
    p = perf_sweep.predict_sweep(costs, [task], {task.id: 297}, epochs=2, train_images=100)
    m = task.test_size
    assert p["ours_decode_s"] == pytest.approx((100 + m) / 1000)
    assert p["ours_train_s"] == pytest.approx(2 * 100 * 0.1 / 10 * 2.0)  # twice the floor at 297 tokens
    assert p["ours_eval_s"] == pytest.approx(m / 50 * 2.0)
    assert p["official_train_s"] == pytest.approx(2 * max(100 * 0.2 / 10 * 3.0, 100 / 1000))
    assert p["official_eval_s"] == pytest.approx(2 * max(m / 25 * 3.0, m / 1000))
    assert p["speedup"] == pytest.approx(p["official_s"] / p["ours_s"])
    # Frozen features: both splits through the backbone once, then the head's epochs.
    costs.head_ips = 1e4
    q = perf_sweep.predict_sweep(costs, [task], {task.id: 197}, epochs=2, train_images=100)
    assert q["ours_eval_s"] == pytest.approx((100 + m) / 50) and q["ours_train_s"] == pytest.approx(2 * 100 / 1e4)


class _SyncOps(TorchDispatchMode):
    """Records operators that read a tensor's value on the host or whose output shape depends on its values:
    each would make a GPU stream wait for the host."""

    SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "equal", "is_nonzero")

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in self.SYNCING:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


# LION's equilibrium solves stop early once the residual is small, which torchdeq decides on the host
# after each solver iteration: inherent to an adaptive solver, and the one exception.
HOST_READS_BY_DESIGN = {"lion"}
# peft's LoHa and LoKr (module dropout) and BOFT (multiplicative dropout) draw a random number on the CPU and read
# it in Python every step: a read of a CPU tensor, which does not wait for the device.
HOST_READS_BY_DESIGN |= {"peft_boft", "peft_loha", "peft_lokr"}


@pytest.mark.parametrize("name", list_methods())
def test_method_speed_features(name, monkeypatch):
    """The per-method speed features on one tiny build: every attention goes through
    `scaled_dot_product_attention`; the explicit-attention switch gives the same logits; and the training step
    (loss, backward, the fused optimiser as on a GPU) never synchronises with the host (but for
    `HOST_READS_BY_DESIGN`)."""
    model, task = tiny_model(name)
    x = torch.randn(2, 3, 32, 32)
    calls = []
    real = F.scaled_dot_product_attention
    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
        fused = model.eval()(x)
    assert len(calls) == len(model.backbone.blocks)

    with torch.no_grad():
        perf_timing.set_attention(model, "explicit")
        explicit = model(x)
    torch.testing.assert_close(explicit, fused, rtol=1e-4, atol=1e-5)
    perf_timing.set_attention(model, "fused")

    if name in HOST_READS_BY_DESIGN:
        return
    module = ClassificationModule(model, num_classes=task.num_classes, recipe=get_method(name)().recipe)
    module.fused_optimizer = True  # as on a GPU
    optimizer = module.configure_optimizers()["optimizer"]
    module.on_train_epoch_start()
    batch = (torch.randn(4, 3, 32, 32), torch.randint(0, task.num_classes, (4,)))
    module.training_step(batch, 0).backward()  # warm-up (lazy state)
    optimizer.step()
    with _SyncOps() as ops:
        loss = module.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert ops.seen == []


def test_sync_detector_catches_item():
    with _SyncOps() as ops:
        torch.ones(2).sum().item()
    assert ops.seen == ["_local_scalar_dense"]


def test_resident_splits_serve_the_same_batches():
    rng = np.random.default_rng(0)
    train = SplitArrays("train800", rng.integers(0, 255, (20, 3, 8, 8), dtype=np.uint8), np.arange(20) % 3, "x")
    ev = SplitArrays("test", rng.integers(0, 255, (7, 3, 8, 8), dtype=np.uint8), np.arange(7) % 3, "y")
    kw = dict(batch_size=6, eval_batch_size=4, seed=3, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    host, resident = VTABDataModule(train, ev, **kw), VTABDataModule(train, ev, on_device="on", **kw)
    resident.resident = resident.move_to(torch.device("cpu"))

    class _Trainer:
        training = True

    resident.trainer = _Trainer()  # which split an index batch refers to
    for a, b in zip(host.train_dataloader(), resident.train_dataloader(), strict=True):
        xa, ya = host.on_after_batch_transfer(a, 0)
        xb, yb = resident.on_after_batch_transfer(b, 0)
        torch.testing.assert_close(xa, xb)
        assert torch.equal(ya, yb)
    _Trainer.training = False
    got = [resident.on_after_batch_transfer(b, 0)[1] for b in resident.test_dataloader()]
    assert torch.equal(torch.cat(got), torch.as_tensor(ev.labels))


def test_peak_memory_sees_an_allocation():
    memory = perf_timing.PeakMemory(torch.device("cpu"))
    if memory.kind != perf_timing.PHASE_PEAK:
        pytest.skip("no /proc/self/clear_refs here: the peak cannot be reset per phase")
    memory.settle()
    before = memory.current()
    memory.reset()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert memory.peak() - before >= 60
    del block


def test_speed_only_settings_are_recorded_but_not_part_of_a_runs_identity():
    from dataclasses import asdict, replace

    from benchmark.run.runner import SPEED_ONLY, Settings
    from benchmark.sweep.resume import identity

    base = Settings(backbone="test_vit")
    fast = replace(base, compile=True, data_on_device="on", eval_batch_size=1024)
    assert {k for k, v in asdict(fast).items() if asdict(base)[k] != v} == set(SPEED_ONLY)
    assert identity(asdict(fast), deferred=False, grid=False) == identity(asdict(base), deferred=False, grid=False)
    slow = replace(base, precision="bf16")  # numerics are part of it
    assert identity(asdict(slow), deferred=False, grid=False) != identity(asdict(base), deferred=False, grid=False)


def test_perf_times_a_method_that_loads_pretrained_weights_on_random_ones():
    """Speed does not depend on the weights: Sidetune's ImageNet AlexNet (not downloadable here) is timed at random
    init, its other settings kept, and the row's note says so; a method without such an option is timed as given."""
    from benchmark.perf.build import timed_config

    sidetune = get_method("sidetune")(side_weights="imagenet", side_image_size=64)
    cfg, note = timed_config(sidetune, tiny_vit(), get_task("eurosat"))
    assert (cfg.side_weights, cfg.side_image_size) == ("none", 64)
    assert note == "random side_weights=none (speed does not depend on weights)"
    lora, note = timed_config(get_method("lora")(), tiny_vit(), get_task("eurosat"))
    assert note is None and lora == get_method("lora")()
