"""Suites: which tasks are learnt together, how their splits lie on disk, and which split does what.

A suite is the unit a paper's table reports on: VTAB-1k's 19 tasks (three groups) and the five FGVC
datasets of VPT's table. Its split roles are the protocol as code: a `tune` run trains on one split and is
scored on another (selection never sees the test split); a `final` run trains on its own split and reports
the test accuracy after the last epoch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Suite:
    """One suite of tasks.

    Attributes:
        id: the suite's name on the command line (`--suite`) and in results.
        title: how tables and pages name it.
        groups: the task groups, in table order (a suite without groups has one, named like the suite).
        splits: the split files every task has on disk.
        tune: (train split, evaluation split) of a tuning run (grid points, pruning decisions).
        final: (train split, evaluation split) of a final run.
        layout: `txt` (`<split>.txt` lines `path label`) or `json` (`<split>.json`, one object path -> class id).
        augment: `none` (the image resized straight to the model's size) or `crop_flip` (VPT's FGVC
            transforms: resize the shorter side to size/0.875, a random crop of the model's size and a
            horizontal flip when training, the centre crop when evaluating).
        interpolation: the resize filter the suite's code bases use (`--interpolation` overrides it).
        spec: where the suite's facts come from.
    """

    id: str
    title: str
    groups: tuple[str, ...]
    splits: tuple[str, ...]
    tune: tuple[str, str]
    final: tuple[str, str]
    layout: str
    augment: str
    interpolation: str
    spec: str

    @property
    def modes(self) -> dict[str, tuple[str, str]]:
        """(train, evaluation) split per run mode."""
        return {"tune": self.tune, "final": self.final}

    @property
    def protocol_splits(self) -> tuple[str, ...]:
        """Every split a tuned protocol reads (tune, then final), each once, in that order."""
        return tuple(dict.fromkeys((*self.tune, *self.final)))


VTAB1K = Suite(
    id="vtab1k",
    title="VTAB-1k",
    groups=("natural", "specialized", "structured"),
    splits=("train800", "val200", "train800val200", "test"),
    tune=("train800", "val200"),
    final=("train800val200", "test"),
    layout="txt",
    augment="none",
    interpolation="bicubic",
    spec="docs/data.md",
)
FGVC = Suite(
    id="fgvc",
    title="FGVC",
    groups=("fgvc",),
    splits=("train", "val", "test"),
    # VPT's FGVC protocol: select on val, and train the final runs on train again (train.py uses trainval
    # only for VTAB tasks), testing once after the last epoch.
    tune=("train", "val"),
    final=("train", "test"),
    layout="json",
    augment="crop_flip",
    # VPT's transforms.py calls torchvision's Resize without an interpolation: bilinear.
    interpolation="bilinear",
    spec="docs/data.md",
)
SUITES: dict[str, Suite] = {s.id: s for s in (VTAB1K, FGVC)}
DEFAULT_SUITE = VTAB1K.id


class UnknownSuiteError(KeyError):
    """A suite name that is not one of `SUITES`."""

    def __str__(self) -> str:
        return str(self.args[0])


def get_suite(name: str) -> Suite:
    """The suite called `name` (case-insensitive)."""
    try:
        return SUITES[name.strip().lower()]
    except KeyError:
        raise UnknownSuiteError(f"unknown suite {name!r}; suites: {', '.join(SUITES)}") from None
