"""Every task of every suite, by name: lookup, listing and the `--tasks` syntax."""

from __future__ import annotations

from tasks.fgvc import FGVC_TASKS
from tasks.suites import DEFAULT_SUITE, SUITES, get_suite
from tasks.task import Task
from tasks.vtab import TASKS

ALL_TASKS: tuple[Task, ...] = (*TASKS, *FGVC_TASKS)
_BY_NAME: dict[str, Task] = {}
for _task in ALL_TASKS:
    for _name in _task.names:
        if _BY_NAME.setdefault(_name.lower(), _task) is not _task:
            raise ValueError(f"task name {_name!r} names both {_BY_NAME[_name.lower()].id} and {_task.id}")


class UnknownTaskError(KeyError):
    """A task name that is neither a canonical id nor an alias."""

    def __str__(self) -> str:
        return str(self.args[0])


def get_task(name: str, suite: str | None = None) -> Task:
    """Resolve a canonical id or alias (case-insensitive) to its task, optionally only within one suite."""
    task = _BY_NAME.get(name.strip().lower())
    if task is None or (suite is not None and task.suite != get_suite(suite).id):
        pool = list_tasks(suite=suite)
        known = ", ".join(t.id for t in pool)
        where = f" in suite {get_suite(suite).id}" if suite is not None else ""
        also = f" (it is a task of suite {task.suite}: pass --suite {task.suite})" if task is not None else ""
        raise UnknownTaskError(f"unknown task {name!r}{where}{also}; known tasks: {known}")
    return task


def list_tasks(group: str | None = None, suite: str | None = None) -> list[Task]:
    """The tasks in table order: one suite's (every suite's when `suite` is None), optionally only one group."""
    pool = [t for t in ALL_TASKS if suite is None or t.suite == get_suite(suite).id]
    if group is not None:
        groups = dict.fromkeys(g for s in SUITES.values() if suite is None or s.id == suite for g in s.groups)
        if group not in groups:
            raise ValueError(f"unknown group {group!r}; groups: {', '.join(groups)}")
    return [t for t in pool if group is None or t.group == group]


def parse_tasks(spec: str, suite: str = DEFAULT_SUITE) -> list[Task]:
    """Parse `all`, a group name, or a comma-separated list of task names of `suite` (duplicates removed,
    order kept)."""
    the_suite = get_suite(suite)
    spec = spec.strip()
    if spec.lower() == "all":
        return list_tasks(suite=the_suite.id)
    if spec.lower() in the_suite.groups and spec.lower() not in _BY_NAME:
        return list_tasks(spec.lower(), suite=the_suite.id)
    tasks: list[Task] = []
    for name in spec.split(","):
        if not name.strip():
            continue
        task = get_task(name, the_suite.id)
        if task not in tasks:
            tasks.append(task)
    if not tasks:
        raise UnknownTaskError("no task given; pass `all`, a group name or a comma-separated list of task ids")
    return tasks
