"""`python -m benchmark data`: fetch the community VTAB-1k archive (or take a suite's data from `--from`),
validate, install, cache, export.

The VTAB-1k archive is `vtab-1k.zip` in the Hugging Face dataset repo `XiN0919/VTAB-1k` (NOAH's folder
format); `--from` takes a local copy instead. FGVC's images are never downloaded (each dataset has its own
terms): `--from` names a folder or archive holding the datasets in VPT's layout, or they are validated where
they already lie under `--out`. The data handling itself lives in `tasks.archive` and `tasks.sources`; this
module adds the download, the report, the uint8 image cache (`benchmark.data.arrays.load_split_images`) and
the export as Hugging Face `datasets`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from benchmark.core.errors import UserError
from benchmark.core.paths import check_dir
from benchmark.run.results import check_writable
from tasks import DataError, SplitFile, Task, read_split, sources
from tasks import archive as arc
from tasks.fgvc_sources import SPLITS_ARCHIVE, SPLITS_REPO

REPO_ID = "XiN0919/VTAB-1k"
FILENAME = "vtab-1k.zip"
REPO_URL = f"https://huggingface.co/datasets/{REPO_ID}"
HAND_ADVICE = f"download {FILENAME} by hand from {REPO_URL} and pass it with `--from FILE` (or an unpacked copy with `--from DIR`)"
HF_VERSION = 1
HF_MARKER = "peft-bench.json"


def out_location(out: Path | None = None) -> tuple[Path, str]:
    """Where the task folders go and the setting it came from: `--out`, else `$VTAB_ROOT`, else
    `$HOME/.cache/peft-bench/vtab-1k`."""
    if out is not None:
        return Path(out).expanduser(), "--out"
    if os.environ.get("VTAB_ROOT"):
        return Path(os.environ["VTAB_ROOT"]).expanduser(), "$VTAB_ROOT"
    return Path.home() / ".cache" / "peft-bench" / "vtab-1k", "$HOME"


def _say(message: str) -> None:
    print(message, flush=True)


# -- download ----------------------------------------------------------------------------------------------
def download_archive(revision: str | None = None) -> Path:
    """The archive from the Hugging Face cache, or downloaded into it; every failure is one `UserError` line.

    huggingface_hub retries unreachable hosts for a long time with a log line per try, so a short
    connection check comes first.
    """
    import huggingface_hub
    from huggingface_hub import constants

    what = f"{FILENAME} of the dataset repo {REPO_ID}"
    try:
        cached = huggingface_hub.try_to_load_from_cache(REPO_ID, FILENAME, revision=revision, repo_type="dataset")
    except Exception:  # an unusual cache layout or revision: fall through to the download
        cached = None
    if isinstance(cached, str):
        return Path(cached)
    offline_env = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if constants.HF_HUB_OFFLINE or offline_env:
        raise UserError(f"{what} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; {HAND_ADVICE}")
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as e:
        raise UserError(f"cannot reach the Hugging Face Hub ({host}: {e}) to download {what}; {HAND_ADVICE}") from None
    _say(f"downloading {what} (about 4.7 GB) into the Hugging Face cache")
    try:
        path = huggingface_hub.hf_hub_download(
            repo_id=REPO_ID, filename=FILENAME, repo_type="dataset", revision=revision
        )
    except Exception as e:  # the Hub raises many types (HTTP, not found, disk full); report it in one line
        lines = str(e).strip().splitlines()
        reason = lines[0][:200] if lines else type(e).__name__
        raise UserError(f"could not download {what} ({type(e).__name__}: {reason}); {HAND_ADVICE}") from None
    return Path(path)


# -- report ------------------------------------------------------------------------------------------------
def format_table(rows: list[dict]) -> str:
    """A plain left-aligned text table (numbers right-aligned)."""
    if not rows:
        return ""
    cols = list(rows[0])
    cells = [[str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    numeric = [all(isinstance(r[c], int | float) or r[c] == "-" for r in rows) for c in cols]

    def fmt(values: list[str]) -> str:
        cells = (v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric, strict=True))
        return "  ".join(cells).rstrip()

    return "\n".join([fmt(cols), *(fmt(row) for row in cells)])


def print_report(reports: list[arc.TaskReport]) -> None:
    _say(format_table(arc.report_rows(reports)))
    for r in reports:
        for problem in r.problems:
            _say(f"  {r.task.id}: {problem}")


# -- cache and datasets export -----------------------------------------------------------------------------
def build_cache(
    task_dir: Path, task: Task, image_size: int, interpolation: str, cache_dir: Path | None, workers: int
) -> dict[str, SplitFile]:
    """Decode every split once into the uint8 cache (a no-op for splits already cached)."""
    from benchmark.data.arrays import load_split_images

    splits = {s: read_split(task_dir, task, s) for s in task.suite_info.splits}
    for split_file in splits.values():
        load_split_images(split_file, image_size, interpolation, cache_dir, workers=workers)
    return splits


def export_hf(out: Path, task: Task, splits: dict[str, SplitFile]) -> tuple[Path, bool]:
    """Write the task as a `datasets.DatasetDict` under `<out>/hf/<task id>`; returns (path, whether written).

    Skipped when the folder's marker matches the split files. Saved into a staging folder and renamed
    into place, so `datasets.load_from_disk` never sees a half-written dataset.
    """
    import datasets
    from datasets import ClassLabel, Dataset, DatasetDict, Image

    hf_root = Path(out) / "hf"
    dest = hf_root / task.id
    stamp = {
        "version": HF_VERSION,
        "task": task.id,
        "splits": {s: sf.sha256 for s, sf in splits.items()},
        "task_dir": str(next(iter(splits.values())).path.parent.resolve()),
    }
    try:
        if json.loads((dest / HF_MARKER).read_text()) == stamp:
            return dest, False
    except (OSError, ValueError):
        pass
    hf_root.mkdir(parents=True, exist_ok=True)
    arc.clean_leftovers(hf_root)
    tmp = hf_root / f"{sources.STAGING_PREFIX}{task.id}-{secrets.token_hex(4)}"
    old = hf_root / f"{arc.OLD_PREFIX}{task.id}-{secrets.token_hex(4)}"
    bars = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        label = ClassLabel(num_classes=task.num_classes)
        dd = DatasetDict(
            {
                s: Dataset.from_dict({"image": [str(p) for p in sf.images], "label": list(sf.labels)})
                .cast_column("image", Image())
                .cast_column("label", label)
                for s, sf in splits.items()
            }
        )
        dd.save_to_disk(str(tmp))
        (tmp / HF_MARKER).write_text(json.dumps(stamp, indent=1) + "\n")
        if dest.exists():
            dest.rename(old)
        tmp.rename(dest)
    finally:
        if bars:
            datasets.enable_progress_bars()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return dest, True


# -- the command -------------------------------------------------------------------------------------------
def run(
    tasks: list[Task],
    *,
    out: Path | None = None,
    out_how: str = "--out",
    source: Path | None = None,
    revision: str | None = None,
    image_size: int = 224,
    interpolation: str = "bicubic",
    cache_dir: Path | None = None,
    cache: bool = True,
    hf: bool = False,
    workers: int = 0,
    download: Callable[[str | None], Path] = download_archive,
) -> int:
    """Fetch (or take `source`), validate, install under `out`, report, cache, export; UserError on any failure.

    `tasks` are of one suite. VTAB-1k's `out` defaults to `out_location`; `out_how` names the setting an
    `out` passed in came from. An FGVC task neither installed nor in `source` is reported with where to get it.
    """
    suite = tasks[0].suite_info
    assert all(t.suite == suite.id for t in tasks), "tasks of one suite"
    vtab = suite.id == "vtab1k"
    wanted = f"the downloaded {FILENAME}" if vtab else "a folder or archive holding the FGVC datasets in VPT's layout"
    if out is None:
        out, how = out_location(out)
    else:
        out, how = Path(out).expanduser(), out_how
    out = out.absolute()
    if cache and not vtab:
        # FGVC's runs cache each image at their resize size (shorter side size/0.875, for the crops), which
        # depends on the backbone's image size: the first run builds that cache, not this command.
        _say("FGVC: no image cache built here; the first run on each dataset decodes it once into the cache")
        cache = False
    if source is not None:
        source = Path(source).expanduser()
        if not source.exists():
            raise UserError(f"--from {source} does not exist; pass {wanted} or an unpacked folder")
    env = "$VTAB_ROOT" if vtab else "$FGVC_ROOT"
    check_dir(out, "data directory", how, f"pass --out DIR (or set {env}) naming a directory")
    check_writable(out, option="--out", what="data directory")
    if cache:
        from benchmark.core.paths import check_cache_dir

        check_cache_dir(cache_dir)
    if hf:
        check_dir(out / "hf", "Hugging Face dataset directory", how, "move it away or pick another --out")

    def get_source() -> sources.Source | None:
        if source is None and not vtab:  # images are never downloaded: each dataset has its owners' terms
            return None
        path = source if source is not None else download(revision)
        return sources.open_source(path, wanted)

    try:
        reports = arc.prepare(out, tasks, get_source, workers=workers, log=_say)
    except DataError as e:
        raise UserError(str(e)) from None
    except OSError as e:
        raise UserError(f"cannot install into {out} ({e}); free some space or pick another --out") from None
    print_report(reports)
    good = [r for r in reports if r.ok]
    if cache:  # all the tasks' entries together: an install never stops for space half-way through decoding
        from benchmark.data.arrays import check_cache_space

        try:
            every = [read_split(r.path, r.task, s) for r in good if r.path is not None for s in suite.splits]
        except DataError as e:
            raise UserError(f"{e} (while caching; run the same command again)") from None
        check_cache_space(every, image_size, interpolation, cache_dir)
    for r in good:
        assert r.path is not None
        try:
            splits = (
                build_cache(r.path, r.task, image_size, interpolation, cache_dir, workers)
                if cache
                else {s: read_split(r.path, r.task, s) for s in suite.splits}
            )
        except DataError as e:
            raise UserError(f"{e} (while caching {r.task.id}; run the same command again)") from None
        if cache:
            n = sum(len(sf) for sf in splits.values())
            _say(f"{r.task.id}: image cache ready ({n} images at {image_size} px, {interpolation})")
        if hf:
            path, written = export_hf(out, r.task, splits)
            _say(f"{r.task.id}: Hugging Face dataset {'written to' if written else 'up to date in'} {path}")
    failed = [r for r in reports if not r.ok]
    if failed:
        names = ", ".join(r.task.id for r in failed)
        fetch = (
            f"fetch a fresh {FILENAME}"
            if vtab
            else f"fetch what each names (split files: {SPLITS_ARCHIVE} of the Hugging Face dataset {SPLITS_REPO})"
        )
        raise UserError(
            f"{len(failed)} of {len(reports)} task(s) failed validation and were not installed ({names}; "
            f"problems listed above); fix the source or {fetch}, then run the same command again"
        )
    _say(f"{len(good)} task(s) ready in {out}; use it with --data-root {out}")
    return 0
