"""What to learn: the VTAB-1k task table and the sources that turn a task into splits."""

from tasks.folder import DataError, SplitFile, decode_image, find_task_dir, read_split
from tasks.vtab import GROUPS, SPLITS, TASKS, Task, UnknownTaskError, get_task, list_tasks, parse_tasks

__all__ = [
    "GROUPS",
    "SPLITS",
    "TASKS",
    "DataError",
    "SplitFile",
    "Task",
    "UnknownTaskError",
    "decode_image",
    "find_task_dir",
    "get_task",
    "list_tasks",
    "parse_tasks",
    "read_split",
]
