"""The protocol's decisions as files: the grid's winner, a pruning stage's candidates (masks) and its choice.

A decision is computed once from the results it depends on (its inputs), written once under a claim (as runs
are), hashed, and read back by every later pass, process and launcher: nothing replays it. Each file records

- `inputs`: a digest of every result file the decision was computed from, so a decision whose inputs have
  changed since (a grid point rerun by `--retry-failed`, a redone dense run) is known to be stale;
- `sha256`: the hash of the decision itself, which every run that depends on it carries in its identity
  (`RunSpec.decisions`), so a result trained under another decision is never taken for a current one.

A file whose content does not match its hash, or that cannot be read, is corrupt: the sweep names it and stops
(`--rerun-stale` decides again). Where they live: `runs/<method>/<task>/decisions/`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import Tensor

from benchmark.core.errors import UserError
from benchmark.run.results import json_text, read_result, write_json
from benchmark.run.schema import CANDIDATES, decision_schema
from benchmark.run.schema import problem as schema_problem
from benchmark.sweep.resume import identity
from tasks.atomic import atomic_write_bytes

DECISIONS_DIR = "decisions"
# The record fields a decision reads from a result (its config compared as resuming compares it).
DIGESTED = ("status", "val_acc", "test_acc", "config")


class DecisionError(UserError):
    """A decision file that is corrupt, or whose content does not match its recorded hash."""


def decisions_dir(task_dir: Path) -> Path:
    return Path(task_dir) / DECISIONS_DIR


def json_hash(obj: Any) -> str:
    """sha256 of `obj` as canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def tensors_hash(state: dict[str, Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order (independent of file layout)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def result_digest(path: Path) -> str | None:
    """What a decision depends on in one result file (None when there is none): its outcome and identity."""
    record = read_result(path)
    return None if record is None else record_digest(record)


def record_digest(record: dict[str, Any]) -> str:
    """`result_digest` of a record already read (or just written: the digest goes through JSON as stored)."""
    fields = {k: record.get(k) for k in DIGESTED}
    fields["config"] = identity(fields["config"] or {}, deferred=False, grid=False)
    return json_hash(fields)


# -- JSON decisions (the grid's winner, a pruning stage's choice) ----------------------------------------------
def write_json_decision(
    path: Path, decision: dict[str, Any], inputs: dict[str, Any], about: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write `decision` with its inputs, what else is worth knowing about it (`about`: e.g. every grid point's
    accuracy) and its hash, which covers the decision alone; returns what a later read gives back. A decision that
    violates its file's schema (`benchmark.run.schema.decision_schema`) is a bug, raised before anything is written."""
    out = {**decision, "about": about or {}, "inputs": inputs, "sha256": json_hash(decision)}
    try:
        decision_schema(Path(path).name).validate_json(json_text(out))
    except ValidationError as e:
        raise ValueError(f"refusing to write an invalid decision to {path}: {schema_problem(e)}") from None
    write_json(path, out)
    return out


def read_json_decision(path: Path) -> dict[str, Any] | None:
    """The stored decision at `path` (None when there is none); a `DecisionError` when it is corrupt."""
    try:
        text = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise DecisionError(corrupt(path, f"it cannot be read: {e.strerror or e}")) from None
    try:
        decision_schema(Path(path).name).validate_json(text)
    except ValidationError as e:
        raise DecisionError(corrupt(path, "it is empty" if not text.strip() else schema_problem(e))) from None
    stored = json.loads(text)
    decision = {k: v for k, v in stored.items() if k not in ("about", "inputs", "sha256")}
    if json_hash(decision) != stored["sha256"]:
        raise DecisionError(corrupt(path, "its content does not match its recorded sha256"))
    return stored


# -- a pruning stage's candidates (masks and rewind values) ------------------------------------------------------
@dataclass
class StoredCandidates:
    """A pruning decision read back: the candidates (as `PruneCandidate` fields), their inputs and hash."""

    candidates: list[dict[str, Any]]  # key, state, info, preference
    inputs: dict[str, Any]
    sha256: str


def candidates_hash(state: dict[str, Tensor], listing: list[dict[str, Any]]) -> str:
    return json_hash({"tensors": tensors_hash(state), "candidates": listing})


def write_candidates(path: Path, candidates: list[Any], inputs: dict[str, Any]) -> StoredCandidates:
    """Write a method's `PruneCandidate`s as one safetensors file (tensors `<key>/<name>`, the rest in the
    metadata) with their inputs and hash; returns what a later read gives back."""
    state = {f"{c.key}/{name}": t.detach().cpu().contiguous() for c in candidates for name, t in c.state.items()}
    listing = [{"key": c.key, "info": c.info, "preference": list(c.preference)} for c in candidates]
    listing = json.loads(json.dumps(listing))  # as read back: tuples become lists
    digest = candidates_hash(state, listing)
    metadata = {"candidates": json.dumps(listing), "inputs": json.dumps(inputs), "sha256": digest}
    try:
        CANDIDATES.validate_python(metadata)
    except ValidationError as e:
        raise ValueError(f"refusing to write invalid candidates to {path}: {schema_problem(e)}") from None
    atomic_write_bytes(Path(path), save(state, metadata=metadata))
    return read_candidates(path)  # type: ignore[return-value]


def read_candidates(path: Path) -> StoredCandidates | None:
    """The stored candidates at `path` (None when there are none); a `DecisionError` when the file is corrupt."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        state = load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        metadata = json.loads(raw[8 : 8 + header_len]).get("__metadata__") or {}
    except (SafetensorError, ValueError, RuntimeError) as e:  # `load` checked the header: a dict of str -> str
        raise DecisionError(corrupt(path, f"it cannot be read ({type(e).__name__})")) from None
    try:
        CANDIDATES.validate_python(metadata)
    except ValidationError as e:
        raise DecisionError(corrupt(path, f"its metadata: {schema_problem(e)}")) from None
    listing, inputs, digest = json.loads(metadata["candidates"]), json.loads(metadata["inputs"]), metadata["sha256"]
    if candidates_hash(state, listing) != digest:
        raise DecisionError(corrupt(path, "its content does not match its recorded sha256"))
    out = []
    for entry in listing:
        prefix = f"{entry['key']}/"
        own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        out.append({**entry, "state": own, "preference": tuple(entry["preference"])})
    return StoredCandidates(out, inputs, digest)


def corrupt(path: Path, why: str) -> str:
    return f"the decision file {path} is corrupt ({why}); pass --rerun-stale to decide again"
