"""The parameter counts of an adapted model, as every method's formula and every built model report them."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ParamReport:
    """Parameter counts of an adapted model.

    Attributes:
        tunable: parameters the method trains, head excluded.
        head: parameters of the classification head.
        backbone: parameters of the pretrained backbone (whether frozen or not), method modules excluded.
        nonzero_tunable: tunable parameters left after pruning (equal to `tunable` for unpruned methods).
    """

    tunable: int
    head: int
    backbone: int
    nonzero_tunable: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
