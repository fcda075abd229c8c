"""One entry point for a task's split file, whatever its suite's layout."""

from __future__ import annotations

from pathlib import Path

from tasks.folder import SplitFile, read_txt_split
from tasks.json_split import read_json_split
from tasks.task import Task

READERS = {"txt": read_txt_split, "json": read_json_split}


def split_file_name(task: Task, split: str) -> str:
    """The file name of `split` in `task`'s folder."""
    return f"{split}.{task.suite_info.layout}"


def read_split(task_dir: Path, task: Task, split: str, *, check_files: bool = True) -> SplitFile:
    """Parse and validate one split file of `task` (`<split>.txt` lines `path label` with labels in [0, C), or
    VPT's `<split>.json`) and, optionally, that every image exists. Raises `DataError` in one line."""
    splits = task.suite_info.splits
    if split not in splits:
        raise ValueError(f"unknown split {split!r} of suite {task.suite}; splits: {', '.join(splits)}")
    return READERS[task.suite_info.layout](task_dir, task, split, check_files=check_files)
