"""One task of a suite: its id, group, classes, split sizes and where its files lie."""

from __future__ import annotations

from dataclasses import dataclass, field

from tasks.suites import SUITES, Suite


@dataclass(frozen=True)
class Task:
    """One task.

    Attributes:
        id: canonical id used everywhere (configs, result files, table columns), unique across suites.
        group: one of its suite's groups.
        num_classes: number of classes; labels are 0-based integers below it.
        test_size: number of images in the test split.
        label_rule: how the label is derived from the source dataset.
        aliases: other names for the task (community layouts, other code bases), matched case-insensitively.
        folder: the task's folder name in its suite's layout.
        split_sizes: entries expected in each split file of the real data (VTAB-1k's follow from the test size).
        suite: the id of the suite the task belongs to.
        image_root: the folder, relative to the task's folder, that the split files' paths are relative to.
        title: the dataset's name as papers print it.
    """

    id: str
    group: str
    num_classes: int
    test_size: int
    label_rule: str = "label"
    aliases: tuple[str, ...] = ()
    folder: str = ""
    split_sizes: dict[str, int] = field(default_factory=dict)
    suite: str = "vtab1k"
    image_root: str = ""
    title: str = ""

    def __post_init__(self) -> None:
        suite = SUITES.get(self.suite)
        if suite is None:
            raise ValueError(f"task {self.id}: suite {self.suite!r} is not one of {tuple(SUITES)}")
        if self.group not in suite.groups:
            raise ValueError(f"task {self.id}: group {self.group!r} is not one of {suite.groups}")
        if not self.folder:
            object.__setattr__(self, "folder", self.id)
        if not self.title:
            object.__setattr__(self, "title", self.id)
        if suite.id == "vtab1k":
            sizes = {"train800": 800, "val200": 200, "train800val200": 1000, "test": self.test_size}
            object.__setattr__(self, "split_sizes", sizes)
        elif set(self.split_sizes) != set(suite.splits):
            raise ValueError(f"task {self.id}: split sizes must name the splits {suite.splits}")

    @property
    def names(self) -> tuple[str, ...]:
        """Every name that resolves to this task, the canonical id first."""
        return (self.id, *self.aliases)

    @property
    def suite_info(self) -> Suite:
        """The task's suite."""
        return SUITES[self.suite]
