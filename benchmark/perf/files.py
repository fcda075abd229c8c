"""Where a measurement goes: a dated JSON of its numbers and its Markdown table, side by side, written atomically."""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmark.run.results import atomic_write_bytes, write_json


def machine() -> str:
    """The measuring machine in a few words: processor and CPU count."""
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def write_measurement(out: Path, name: str, report: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """`out/<name>-<UTC date>.json` (the report) and `.md` (its table); returns both paths."""
    stem = Path(out) / f"{name}-{datetime.now(UTC):%Y-%m-%d}"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    write_json(json_path, report)
    atomic_write_bytes(md_path, (markdown + "\n").encode())
    return json_path, md_path
