"""Which `peft` tuners the suite offers, with which options, and how an option's text becomes a value of the
tuner's peft config field (for `methods.peft_tuners`, the method that applies them).

The table (`TUNERS`) names each tuner's peft config class, how the suite's common options (`r`, `alpha`,
`dropout`, `target_modules`) map onto its fields, the documented configuration (`docs/methods/peft_tuners.md`) and
the tuner's own fields offered through `--set`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from methods import _checks
from methods._checks import parse_option

ADAPTER = "default"
# LoRA initialisations the suite allows (PiSSA, OLoRA, EVA, LoftQ, CorDA rewrite the frozen weights or need data).
INIT_CHOICES = ("true", "false", "gaussian")


@dataclass(frozen=True)
class Tuner:
    """One peft tuner as the suite offers it.

    Attributes:
        config_class: the name of peft's config class.
        common: the suite's common field -> the config class's field (`r`, `alpha`, `dropout`).
        defaults: the documented configuration: common fields by the suite's name, own fields by peft's.
        own: the config class's fields offered through `options`.
        fixed: config fields the tuner always sets (DoRA is LoRA with `use_dora`).
        paper: the paper, for the methods table.
    """

    config_class: str
    common: dict[str, str]
    defaults: dict[str, Any]
    own: tuple[str, ...]
    fixed: dict[str, Any] = field(default_factory=dict)
    paper: str = ""


_LORA_OWN = ("use_rslora", "init_lora_weights")
TUNERS: dict[str, Tuner] = {
    "lora": Tuner("LoraConfig", {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout"},
                  {"r": 8, "alpha": 8, "dropout": 0.1, "target_modules": "qkv"}, (*_LORA_OWN, "use_dora"),
                  paper="Hu et al., ICLR 2022, arXiv 2106.09685"),
    "dora": Tuner("LoraConfig", {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout"},
                  {"r": 8, "alpha": 8, "dropout": 0.1, "target_modules": "qkv"}, _LORA_OWN, {"use_dora": True},
                  paper="Liu et al., ICML 2024, arXiv 2402.09353"),
    "vera": Tuner("VeraConfig", {"r": "r", "dropout": "vera_dropout"},
                  {"r": 256, "dropout": 0.0, "target_modules": "qkv", "d_initial": 0.1, "save_projection": True},
                  ("d_initial", "projection_prng_key", "save_projection", "init_weights"),
                  paper="Kopiczko et al., ICLR 2024, arXiv 2310.11454"),
    "ia3": Tuner("IA3Config", {}, {"target_modules": "qkv,fc2", "feedforward_modules": "fc2"},
                 ("feedforward_modules", "init_ia3_weights"), paper="Liu et al., NeurIPS 2022, arXiv 2205.05638"),
    "boft": Tuner("BOFTConfig", {"dropout": "boft_dropout"},
                  {"dropout": 0.1, "target_modules": "qkv", "boft_block_size": 4, "boft_n_butterfly_factor": 1},
                  ("boft_block_size", "boft_block_num", "boft_n_butterfly_factor", "init_weights"),
                  paper="Liu et al., ICLR 2024, arXiv 2311.06243"),
    # OFT's `r` is its number of blocks (0: derive it from oft_block_size); its dropout is multiplicative.
    "oft": Tuner("OFTConfig", {"r": "r", "dropout": "module_dropout"},
                 {"r": 0, "dropout": 0.0, "target_modules": "qkv", "oft_block_size": 32},
                 ("oft_block_size", "block_share", "coft", "eps", "use_cayley_neumann", "num_cayley_neumann_terms",
                  "init_weights"), paper="Qiu et al., NeurIPS 2023, arXiv 2306.07280"),
    "loha": Tuner("LoHaConfig", {"r": "r", "alpha": "alpha"}, {"r": 8, "alpha": 8, "target_modules": "qkv"},
                  ("rank_dropout", "module_dropout", "init_weights"),
                  paper="Hyeon-Woo et al. (FedPara), ICLR 2022, arXiv 2108.06098"),
    "lokr": Tuner("LoKrConfig", {"r": "r", "alpha": "alpha"}, {"r": 8, "alpha": 8, "target_modules": "qkv"},
                  ("rank_dropout", "module_dropout", "decompose_both", "decompose_factor", "rank_dropout_scale",
                   "init_weights"), paper="Yeh et al. (LyCORIS), ICLR 2024, arXiv 2309.14859"),
}  # fmt: skip
COMMON = ("r", "alpha", "dropout", "target_modules")


def peft_config_class(tuner: str) -> type:
    import peft

    return getattr(peft, TUNERS[tuner].config_class)


def _nonzero_real(view: Any, name: str, tuner: str) -> None:
    _checks.real(view, name)
    if getattr(view, name) == 0:
        # VeRA's λ_b starts at 0: with λ_d = 0 too, neither vector receives a gradient.
        raise _checks.invalid(view, name, "must not be 0: the adapter would never leave its initialisation")


def _factor(view: Any, name: str, tuner: str) -> None:
    _checks.integer(view, name, -1)
    if getattr(view, name) == 0:
        raise _checks.invalid(view, name, "must be -1 (any factor) or at least 1")


def _module_list(view: Any, name: str, tuner: str) -> None:
    if getattr(view, name) == []:
        raise _checks.invalid(view, name, "names no module (none: no feed-forward module)")


# The meaning of every numeric (and list) option a tuner offers, by the suite's option name: each is checked
# here, before peft builds anything, so that a value peft accepts but cannot train with fails in one line.
MEANINGS: dict[str, Callable[[Any, str, str], None]] = {
    **dict.fromkeys(("dropout", "rank_dropout", "module_dropout"), lambda v, n, t: _checks.rates(v, n)),
    # OFT's r is a block count, 0 meaning "derive it from oft_block_size"; elsewhere a rank.
    "r": lambda v, n, t: _checks.integer(v, n, 0 if t == "oft" else 1),
    "alpha": lambda v, n, t: _checks.real(v, n, 0.0, low_open=True),
    # Block size or block count: 0 means "derived from the other" (peft requires exactly one of them).
    **dict.fromkeys(("boft_block_size", "boft_block_num", "oft_block_size"), lambda v, n, t: _checks.integer(v, n, 0)),
    "boft_n_butterfly_factor": lambda v, n, t: _checks.integer(v, n, 1),
    "d_initial": _nonzero_real,
    "projection_prng_key": lambda v, n, t: _checks.integer(v, n, 0, 2**64 - 1),  # torch.Generator's seed range
    "eps": lambda v, n, t: _checks.real(v, n, 0.0, low_open=True),
    # Fewer than 2 terms make the Neumann series the identity: the rotation never moves.
    "num_cayley_neumann_terms": lambda v, n, t: _checks.integer(v, n, 2),
    "decompose_factor": _factor,
    "feedforward_modules": _module_list,
}


@functools.cache
def options_view(tuner: str, names: tuple[str, ...]) -> type:
    """A dataclass with the fields `names` and the tuner's defaults, so that `methods._checks` reads the values as it
    reads a config (built once per tuner and set of names: a protocol plan checks thousands of configs)."""
    spec = TUNERS[tuner]
    peft_defaults = {f.name: f.default for f in dataclasses.fields(peft_config_class(tuner))}
    return dataclasses.make_dataclass(
        f"{tuner}_options",
        [(name, Any, field(default=spec.defaults.get(name, peft_defaults.get(spec.common.get(name, name)))))
         for name in names],
    )  # fmt: skip


def check_values(tuner: str, values: dict[str, Any]) -> None:
    """Check the resolved values (peft's field names) by their meaning (`MEANINGS`); every other number must be
    finite. A failure is a one-line `ValueError` that names the suite's option and suggests the tuner's default."""
    to_option = {peft_name: name for name, peft_name in TUNERS[tuner].common.items()}
    options = {to_option.get(key, key): value for key, value in values.items()}
    view = options_view(tuner, tuple(options))(**options)  # the values with the tuner's defaults
    for name, value in options.items():
        if name in MEANINGS:
            MEANINGS[name](view, name, tuner)
        elif isinstance(value, float | int) and not isinstance(value, bool):
            _checks.real(view, name)


def convert_option(key: str, text: str, hint: Any) -> Any:
    """Text -> a value of a peft config field's type (bool, int, float, str, a Literal, a comma list, or None)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if text.lower() == "none" and type(None) in args:
            return None
        errors = []
        # A comma list before plain text: peft reads a str as a regular expression, a list as name suffixes.
        alternatives = sorted((a for a in args if a is not type(None)), key=lambda a: typing.get_origin(a) is not list)
        for alternative in alternatives:
            try:
                return convert_option(key, text, alternative)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"option {key} cannot be set from the command line")
    if origin is typing.Literal:
        if text in args:
            return text
        raise ValueError(f"option {key} takes one of {', '.join(map(str, args))}, got {text!r}")
    if origin is list and args and args[0] in (str, int):
        items = [t.strip() for t in text.split(",") if t.strip()]
        try:
            return [args[0](t) for t in items]
        except ValueError:
            raise ValueError(f"option {key} takes a comma list of {args[0].__name__}s, got {text!r}") from None
    if hint in (bool, int, float, str):
        return parse_option(key, text, hint)
    raise ValueError(f"option {key} cannot be set from the command line")


def split_targets(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def targeted_linears(backbone: nn.Module, targets: list[str]) -> list[tuple[str, nn.Linear]]:
    """The `nn.Linear` modules peft's suffix matching selects: name equal to a target, or ending in `.target`."""
    return [
        (name, m)
        for name, m in backbone.named_modules()
        if isinstance(m, nn.Linear) and any(name == t or name.endswith(f".{t}") for t in targets)
    ]


def lokr_factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """How LoKr splits a dimension into two factors: `(factor, dim // factor)` when `factor` divides it, else
    the divisor pair (m ≤ n) with m the largest divisor ≤ √dim that does not exceed `factor` (any, for -1)."""
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    limit = dim if factor == -1 else factor
    m = max(d for d in range(1, math.isqrt(dim) + 1) if dim % d == 0 and d <= limit)
    return m, dim // m


def boft_fast_path_only() -> None:
    """Keep peft's BOFT on its PyTorch path.

    peft's BOFT layer tries to JIT-compile a CUDA extension (`fbd_cuda`) every time a layer is built and, when
    that fails, warns twice per layer and falls back to one butterfly factor. The suite always uses the PyTorch
    path (same function, no compiler at run time, no warnings), by marking peft's cached loader result as
    unavailable before the first BOFT layer is built; `boft_n_butterfly_factor` is limited to 1 accordingly.
    """
    from peft.tuners.boft import layer

    if layer._FBD_CUDA is None:
        layer._FBD_CUDA = False
