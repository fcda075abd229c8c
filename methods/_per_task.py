"""Per-task settings: the fields a method's paper sets differently for each task, switched by `per_task`."""

from __future__ import annotations

import dataclasses
from typing import Any, Self


class PerTaskSettings:
    """Mixin of a `MethodConfig` whose paper sets some fields per task (a prompt length, a scale, a recipe).

    The config declares the field `per_task: bool = True` itself (so its docstring documents it) and implements
    `task_values`; `for_task` applies them unless `per_task` is false. Options the user sets win over these
    values: the run's resolution applies them after `for_task` (`benchmark.run.resolve`).
    """

    per_task: bool

    def task_values(self, task_id: str) -> dict[str, Any]:
        """The fields the method sets for `task_id` (none for a task it has no setting for)."""
        raise NotImplementedError

    def for_task(self, task_id: str) -> Self:
        if not self.per_task:
            return self
        values = self.task_values(task_id)
        return dataclasses.replace(self, **values) if values else self  # type: ignore[type-var]
