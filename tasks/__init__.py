"""What to learn: the suites (VTAB-1k, FGVC), their task tables and the sources that turn a task into splits."""

from tasks.catalog import ALL_TASKS, UnknownTaskError, get_task, list_tasks, parse_tasks
from tasks.fgvc import FGVC_TASKS
from tasks.folder import DataError, SplitFile, decode_image, find_task_dir, how_to_get
from tasks.splits import read_split, split_file_name
from tasks.suites import DEFAULT_SUITE, SUITES, Suite, UnknownSuiteError, get_suite
from tasks.task import Task
from tasks.vtab import GROUPS, SPLITS, TASKS

__all__ = [
    "ALL_TASKS",
    "DEFAULT_SUITE",
    "FGVC_TASKS",
    "GROUPS",
    "SPLITS",
    "SUITES",
    "TASKS",
    "DataError",
    "SplitFile",
    "Suite",
    "Task",
    "UnknownSuiteError",
    "UnknownTaskError",
    "decode_image",
    "find_task_dir",
    "get_suite",
    "get_task",
    "how_to_get",
    "list_tasks",
    "parse_tasks",
    "read_split",
    "split_file_name",
]
