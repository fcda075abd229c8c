"""The protocol's decisions are files written once and read back, and every run carries the hashes of the
decisions it was trained under: a changed decision makes the runs after it stale, never silently reused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmark.cli import main
from benchmark.run.runner import new_record
from benchmark.sweep import graph
from benchmark.sweep.decisions import read_candidates, read_json_decision
from methods.e2vpt import E2VPTConfig
from tests.conftest import argv

# A useless and a useful learning rate for the linear probe on the synthetic tasks: the useful one wins.
BAD_LR, GOOD_LR = 1e-9, 0.05


def grid_args(synth_root: Path, results: Path, *extra: str) -> list[str]:
    return argv(f"bench --method linear --tasks svhn --data-root {synth_root} --results {results}",
                "--protocol", "grid", "--lr-grid", f"{BAD_LR},{GOOD_LR}", "--wd-grid", "0", "--epochs", "2",
                "--seeds", "42,44", *extra)  # fmt: skip


def finals(results: Path, method: str, task: str, protocol: str = "final") -> list[dict]:
    paths = sorted((results / "runs" / method / task).glob(f"{protocol}-s*.json"))
    assert paths, f"no {protocol} runs of {method} on {task}"
    return [json.loads(p.read_text()) for p in paths]


def test_grid_winner_is_a_file_and_the_finals_carry_its_hash(synth_root, tmp_path):
    results = tmp_path / "r"
    assert main(grid_args(synth_root, results)) == 0
    decision = read_json_decision(results / "runs/linear/svhn/decisions/grid-selection.json")
    assert decision["lr"] == GOOD_LR and len(decision["about"]["grid"]) == 2
    assert set(decision["inputs"]) == {f"lr{BAD_LR:g}-wd0.json", f"lr{GOOD_LR:g}-wd0.json"}
    for r in finals(results, "linear", "svhn", "grid"):
        assert r["config"]["decisions"] == {"selection": decision["sha256"]}
        assert r["selection"]["sha256"] == decision["sha256"] and r["selection"]["lr"] == GOOD_LR


def test_a_retried_grid_point_that_changes_the_winner_makes_the_finals_stale(synth_root, tmp_path, monkeypatch,
                                                                                capsys):  # fmt: skip
    """The good grid point fails at first (an out-of-memory, say): the finals train with the bad lr. Retried, it
    wins: the finals trained under the old winner must not be reused, and are rerun only when asked."""
    results = tmp_path / "r"
    real = graph.execute

    def oom_on_the_good_lr(spec, *args, **kwargs):
        if spec.mode == "tune" and spec.config.recipe.lr == GOOD_LR:
            return {**new_record(spec, args[1]), "error": "OutOfMemoryError: simulated"}
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(graph, "execute", oom_on_the_good_lr)
    assert main(grid_args(synth_root, results)) == 0
    assert {r["selection"]["lr"] for r in finals(results, "linear", "svhn", "grid")} == {BAD_LR}
    before = {p: p.read_bytes() for p in (results / "runs/linear/svhn").glob("grid-s*.json")}
    monkeypatch.setattr(graph, "execute", real)
    capsys.readouterr()

    assert main(grid_args(synth_root, results, "--retry-failed")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "grid-selection.json" in err[0] and "--rerun-stale" in err[0], err
    assert {p: p.read_bytes() for p in before} == before  # the finals are untouched

    assert main(grid_args(synth_root, results, "--rerun-stale")) == 0
    decision = read_json_decision(results / "runs/linear/svhn/decisions/grid-selection.json")
    assert decision["lr"] == GOOD_LR
    rerun = finals(results, "linear", "svhn", "grid")
    assert [r["selection"]["lr"] for r in rerun] == [GOOD_LR, GOOD_LR]
    assert all(r["config"]["decisions"]["selection"] == decision["sha256"] for r in rerun)


def e2vpt_args(synth_root: Path, results: Path, *extra: str) -> list[str]:
    return argv(f"bench --method e2vpt --tasks camelyon --data-root {synth_root} --results {results}",
                "--epochs", "1", "--batch-size", "32", "--seeds", "42",
                "--set", "max_token_levels=2", "--set", "max_segment_levels=2", *extra)  # fmt: skip


@pytest.mark.slow
def test_pruning_masks_are_decided_once_and_every_later_run_carries_their_hash(synth_root, tmp_path, monkeypatch,
                                                                                 capsys):  # fmt: skip
    results = tmp_path / "r"
    calls = []
    real = E2VPTConfig.prune_candidates

    def counted(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(E2VPTConfig, "prune_candidates", counted)
    assert main(e2vpt_args(synth_root, results)) == 0
    assert len(calls) == 1
    decided = results / "runs/e2vpt/camelyon/decisions"
    stored = read_candidates(decided / "final-prune-candidates.safetensors")
    choice = read_json_decision(decided / "final-prune-choice.json")
    assert [c["key"] for c in stored.candidates] == ["tok1-seg1", "tok1-seg12", "tok9-seg1", "tok9-seg12"]
    assert choice["candidates"] == stored.sha256
    for path in (results / "runs/e2vpt/camelyon/final-prune").glob("rewind-*.json"):
        assert json.loads(path.read_text())["config"]["decisions"] == {"candidates": stored.sha256}
    (final,) = finals(results, "e2vpt", "camelyon")
    assert final["config"]["decisions"] == {"pruning": choice["sha256"]}
    assert final["pruning"]["candidate"] == choice["candidate"] and final["pruning"]["decision"] == choice["sha256"]

    # Walked again, nothing is decided again: the masks are read back from their file.
    assert main(e2vpt_args(synth_root, results)) == 0
    assert len(calls) == 1

    # A decision file that does not match its hash stops the sweep with one line naming it.
    path = decided / "final-prune-candidates.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    capsys.readouterr()
    assert main(e2vpt_args(synth_root, results)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and "corrupt" in err[0], err
    # Decided again on request: the same dense run gives the same masks, so no run after it is stale.
    mtimes = {p: p.stat().st_mtime_ns for p in (results / "runs/e2vpt/camelyon").rglob("*.json")}
    assert main(e2vpt_args(synth_root, results, "--rerun-stale")) == 0
    assert len(calls) == 2 and read_candidates(path).sha256 == stored.sha256
    assert all(p.stat().st_mtime_ns == m for p, m in mtimes.items() if "decisions" not in p.parts)


@pytest.mark.slow
def test_a_redone_dense_run_makes_the_rewinds_and_finals_stale(synth_root, tmp_path, capsys):
    """The dense run's state changes (redone elsewhere, with another outcome): the candidates made from the old
    one are stale, and so are the rewinds and the final runs trained under them."""
    from safetensors.torch import load_file, save_file

    results = tmp_path / "r"
    assert main(e2vpt_args(synth_root, results)) == 0
    stage = results / "runs/e2vpt/camelyon/final-prune"
    state = load_file(str(stage / "dense.safetensors"))
    save_file({k: v.flip(0) if v.ndim else v for k, v in state.items()}, str(stage / "dense.safetensors"))
    old = read_candidates(results / "runs/e2vpt/camelyon/decisions/final-prune-candidates.safetensors")
    capsys.readouterr()
    assert main(e2vpt_args(synth_root, results)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "final-prune-candidates.safetensors" in err[0] and "--rerun-stale" in err[0], err

    assert main(e2vpt_args(synth_root, results, "--rerun-stale")) == 0
    new = read_candidates(results / "runs/e2vpt/camelyon/decisions/final-prune-candidates.safetensors")
    assert new.sha256 != old.sha256
    for path in stage.glob("rewind-*.json"):
        assert json.loads(path.read_text())["config"]["decisions"] == {"candidates": new.sha256}
    choice = read_json_decision(results / "runs/e2vpt/camelyon/decisions/final-prune-choice.json")
    assert choice["candidates"] == new.sha256
    (final,) = finals(results, "e2vpt", "camelyon")
    assert final["config"]["decisions"] == {"pruning": choice["sha256"]}


def rehashed(stored: dict, **edit) -> str:
    """`stored` with `edit` applied to the decision and its hash recomputed: consistent, but against the schema."""
    from benchmark.sweep.decisions import json_hash

    decision = {k: v for k, v in {**stored, **edit}.items() if k not in ("about", "inputs", "sha256")}
    return json.dumps({**stored, **edit, "sha256": json_hash(decision)})


GRID_ABOUT = {"lr": 0.1, "weight_decay": 0.0, "val_acc": 50.0, "tuning_seed": 42, "grid": [[0.1, 0.0, 50.0]]}


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: "{not json",
        lambda d: "",
        lambda d: b"\x00\xff\xfe garbage",
        lambda d: json.dumps([1, 2]),
        lambda d: json.dumps({**d, "lr": 0.5}),  # the decision edited, its hash not
        lambda d: json.dumps({k: v for k, v in d.items() if k != "sha256"}),
        # Consistent with their hashes, but not decisions a sweep can use:
        lambda d: rehashed(d, lr="0.1"),
        lambda d: json.dumps({k: v for k, v in d.items() if k != "about"}),
        lambda d: json.dumps({**d, "inputs": 5}),
        lambda d: json.dumps({**d, "about": {**d["about"], "grid": [[0.1, 0.0]]}}),
    ],
    ids=["not-json", "empty", "binary", "list", "edited", "no-hash", "text-lr", "no-about", "inputs-5", "short-grid"],
)
def test_a_damaged_json_decision_is_named_as_corrupt(tmp_path, damage):
    from benchmark.sweep.decisions import DecisionError, write_json_decision

    path = tmp_path / "grid-selection.json"
    decision = {"lr": 0.1, "weight_decay": 0.0, "tuning_seed": 42}
    stored = write_json_decision(path, decision, {"lr0.1-wd0.json": "ab"}, GRID_ABOUT)
    assert read_json_decision(path) == stored
    damaged = damage(stored)
    path.write_bytes(damaged if isinstance(damaged, bytes) else damaged.encode())
    with pytest.raises(DecisionError, match=rf"the decision file {path} is corrupt .*--rerun-stale"):
        read_json_decision(path)


@pytest.mark.parametrize("edit", [{"candidate": None}, {"candidates": "not a hash"}])
def test_a_prune_choice_against_its_schema_is_named_as_corrupt(tmp_path, edit):
    from benchmark.sweep.decisions import DecisionError, write_json_decision

    path = tmp_path / "final-prune-choice.json"
    decision = {"candidate": "tok1-seg1", "candidates": "0" * 64}
    stored = write_json_decision(path, decision, {"candidates": "0" * 64}, {"search": [["tok1-seg1", 50.0]]})
    assert read_json_decision(path) == stored
    path.write_text(rehashed(stored, **edit))
    with pytest.raises(DecisionError, match=rf"the decision file {path} is corrupt \(its `candidate"):
        read_json_decision(path)


@pytest.mark.parametrize(
    "listing",
    [
        [{"key": "tok1-seg1", "info": {}}],  # no preference
        {"key": "tok1-seg1", "info": {}, "preference": []},  # not a list
        [{"key": "", "info": {}, "preference": []}],
    ],
)
def test_candidates_whose_listing_breaks_the_schema_are_named_as_corrupt(tmp_path, listing):
    """The listing's hash is recomputed: only the schema tells that no sweep can use it."""
    import torch
    from safetensors.torch import load_file, save_file

    from benchmark.sweep.decisions import DecisionError, candidates_hash, write_candidates
    from methods import PruneCandidate

    path = tmp_path / "final-prune-candidates.safetensors"
    write_candidates(
        path, [PruneCandidate("tok1-seg1", {"mask": torch.ones(3)}, {"kept": 1}, (1.0,))], {"dense": "ab"}
    )
    state = load_file(str(path))
    metadata = {"candidates": json.dumps(listing), "inputs": json.dumps({"dense": "ab"}),
                "sha256": candidates_hash(state, listing)}  # fmt: skip
    save_file(state, str(path), metadata=metadata)
    with pytest.raises(DecisionError, match=rf"the decision file {path} is corrupt \(its metadata: .*--rerun-stale"):
        read_candidates(path)


def sct_args(synth_root: Path, results: Path, *extra: str) -> list[str]:
    return argv(f"bench --method sct --tasks camelyon --data-root {synth_root} --results {results}",
                "--epochs", "1", "--seeds", "42", "--set", "k=8", *extra)  # fmt: skip


@pytest.mark.slow
def test_a_decision_from_the_pretrained_model_is_made_once_and_checked_before_any_training(synth_root, tmp_path,
                                                                                         monkeypatch, capsys):  # fmt: skip
    """SCT's channels: no dense run; the decision's inputs are the identity of the model and data it is made on.
    A damaged or stale decision stops the sweep with one line before anything trains; deleted, it is made again
    (the same channels, so no run after it is stale)."""
    from benchmark.sweep.decisions import write_candidates
    from methods._base import PruneCandidate
    from methods.sct import SCTConfig

    results = tmp_path / "r"
    calls = []
    real = SCTConfig.prune_candidates
    monkeypatch.setattr(SCTConfig, "prune_candidates", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    assert main(sct_args(synth_root, results)) == 0 and len(calls) == 1
    task_dir = results / "runs/sct/camelyon"
    assert not (task_dir / "final-prune").exists()  # no dense run
    path = task_dir / "decisions/final-prune-candidates.safetensors"
    stored = read_candidates(path)
    assert set(stored.inputs) == {"pretrained"}
    (final,) = finals(results, "sct", "camelyon")
    choice = read_json_decision(task_dir / "decisions/final-prune-choice.json")
    assert final["config"]["decisions"] == {"pruning": choice["sha256"]} and choice["candidates"] == stored.sha256
    trained = {p: p.stat().st_mtime_ns for p in task_dir.glob("final-s*.json")}

    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    capsys.readouterr()
    assert main(sct_args(synth_root, results)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and "corrupt" in err[0], err

    candidates = [PruneCandidate(**c) for c in stored.candidates]
    write_candidates(path, candidates, {"pretrained": "0" * 64})  # made from another model or data
    assert main(sct_args(synth_root, results)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and "--rerun-stale" in err[0], err
    assert len(calls) == 1 and {p: p.stat().st_mtime_ns for p in trained} == trained

    path.unlink()
    assert main(sct_args(synth_root, results)) == 0 and len(calls) == 2
    assert read_candidates(path).sha256 == stored.sha256
    assert {p: p.stat().st_mtime_ns for p in trained} == trained
