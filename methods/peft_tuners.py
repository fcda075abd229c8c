"""Hugging Face `peft` tuners (LoRA, DoRA, VeRA, IA³, BOFT, OFT, LoHa, LoKr) on timm's ViT, through the library.

`peft` is the library people use for the LoRA family; nothing here re-implements a tuner. One generic method
(`peft`, `--set tuner=lora|dora|vera|ia3|boft|oft|loha|lokr`) builds the tuner's peft config from the method's
fields and hands the headless backbone to peft's tuner class, which swaps each targeted `nn.Linear` for its
tuner layer in place (`docs/methods/peft_tuners.md`). The suite's `PeftModel` keeps its own head, so peft's
`modules_to_save` is not needed; the registered names `peft_lora`, `peft_dora`, ... are the same method with
the configuration of `docs/methods/peft_tuners.md` as defaults.

Options (`--set`):
- common: `r`, `alpha`, `dropout`, `target_modules` (a comma list of module-name suffixes: `qkv`, `proj`,
  `fc1`, `fc2`); each maps onto the tuner's own config field (`alpha` -> `lora_alpha` for LoRA, `dropout`
  -> `vera_dropout`, `boft_dropout`, ...) and a tuner that has no such notion refuses it;
- the tuner's own: a few fields of its peft config class, by peft's name (`--set boft_block_size=8`,
  `--set use_rslora=true`, `--set decompose_factor=4`), converted to the field's type; they are kept in
  `options` as text. Fields that would make peft select trainable parameters by name (`bias`,
  `modules_to_save`), rewrite the frozen weights (PiSSA-style initialisations) or change which layers are
  targeted behind the count's back are not offered.
- every value is checked when the config is made, before anything runs: each numeric option by its meaning
  (`MEANINGS` in `methods._peft_options`: drop rates in [0, 1), sizes and counts integers from their least
  useful value, scales and initial values finite), module lists non-empty, then by peft's config class.

What is tunable is found by structure: every peft tuner layer in the backbone (an instance of peft's
`BaseTunerLayer`) declares its adapter containers in `adapter_layer_names` (LoRA's `lora_A`/`lora_B`,
DoRA's magnitude, VeRA's λ vectors, ...); their parameters are the tunable ones. The layer's wrapped base
`nn.Linear` stays frozen. Merging (`merged_backbone`) runs peft's `merge_and_unload` on a deep copy, which
folds every tuner into its base weight and puts the plain `nn.Linear` back: the result is a plain timm
`VisionTransformer` with exactly the backbone's parameters.

On Swin the same suffixes select the same Linears of every block (window attention's `qkv`, `proj`; the MLP's
`fc1`, `fc2`), of their stage's width; the patch mergings' `reduction` is targeted only if named. The formula sums
over the Linears actually selected, and `merge_and_unload` gives back a plain timm `SwinTransformer`.

Recipe: NOAH's LoRA recipe (§1.3: AdamW lr 1e-3, wd 1e-4, batch 64, 100 epochs, timm cosine with 10 warm-up
epochs, drop-path 0.1) for every tuner: none of them has a published VTAB-1k recipe. Grid: PETL_Vision's
lr {1e-2, 1e-3} × wd {1e-4, 1e-3} (§10). Scaling vectors (DoRA's magnitude, VeRA's λ, IA³'s vectors, BOFT's
scale) are not weight-decayed: decay pulls them toward 0, away from their identity initialisation.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from timm.models.vision_transformer import VisionTransformer
from torch import nn

from methods import _checks
from methods._base import MethodConfig, ParamReport, PeftModel, Recipe
from methods._checks import parse_option
from methods._family import backbone_report
from methods._peft_options import (
    ADAPTER,
    COMMON,
    INIT_CHOICES,
    TUNERS,
    boft_fast_path_only,
    check_values,
    convert_option,
    lokr_factorization,
    peft_config_class,
    split_targets,
    targeted_linears,
)
from methods._registry import register_method


def _tunable_recipe() -> Recipe:
    return Recipe(
        optimizer="adamw", lr=1e-3, weight_decay=1e-4, batch_size=64, epochs=100, warmup_epochs=10,
        warmup_start_lr=1e-6, min_lr=1e-5, schedule="timm-cosine", drop_last=True,
        lr_grid=(1e-2, 1e-3), wd_grid=(1e-4, 1e-3),
    )  # fmt: skip


@register_method("peft")
@dataclass
class PeftTunerConfig(MethodConfig):
    """A Hugging Face `peft` tuner on the backbone's Linear layers (default: LoRA r = 8 on the fused qkv).

    Attributes:
        tuner: lora, dora, vera, ia3, boft, oft, loha or lokr.
        r: rank (LoRA, DoRA, VeRA, LoHa, LoKr) or OFT's number of blocks; None: the tuner's documented default.
        alpha: scaling numerator (LoRA's lora_alpha, LoHa's and LoKr's alpha); None: the tuner's default.
        dropout: the tuner's dropout (input dropout for LoRA/DoRA/VeRA, multiplicative for BOFT/OFT); None: default.
        target_modules: comma list of module-name suffixes of the Linears to adapt (qkv, proj, fc1, fc2); None:
            the tuner's default.
        options: the tuner's own config fields by peft's name, as text (converted to each field's type).
        drop_path_rate: the backbone's stochastic depth (NOAH's recipe).
        head_init: `torch` (PyTorch default) or `vpt`.
    """

    category: ClassVar[str] = "peft"
    identity_at_init: ClassVar[bool] = True
    # The tuner a registered `peft_<tuner>` name stands for (None: any, chosen by `tuner`).
    fixed_tuner: ClassVar[str | None] = None
    families: ClassVar[tuple[str, ...]] = ("vit", "swin")

    recipe: Recipe = field(default_factory=_tunable_recipe)
    tuner: str = "lora"
    r: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    target_modules: str | None = None
    options: dict[str, str] = field(default_factory=dict)
    drop_path_rate: float = 0.1
    head_init: str = "torch"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.fixed_tuner is not None and self.tuner != self.fixed_tuner:
            raise ValueError(f"{self.name} is peft's {self.fixed_tuner}; for another tuner use --method peft "
                             f"--set tuner={self.tuner}")  # fmt: skip
        self.check_choices({"tuner": tuple(TUNERS), "head_init": ("torch", "vpt")})
        _checks.rates(self, "drop_path_rate")
        self.options = {str(k): str(v) for k, v in self.options.items()}
        self.peft_config()  # every value checked now, by the suite and by peft, not at build time

    # -- the peft config -----------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """The resolved values: the tuner's defaults, then the common fields set, then `options`, by the
        config class's field names (without `target_modules`)."""
        spec = TUNERS[self.tuner]
        hints = _checks.type_hints(peft_config_class(self.tuner))
        values: dict[str, Any] = {}
        for key, value in spec.defaults.items():
            if key in spec.common:
                values[spec.common[key]] = value
            elif key != "target_modules":
                values[key] = convert_option(key, str(value), hints[key]) if isinstance(value, str) else value
        for key in ("r", "alpha", "dropout"):
            value = getattr(self, key)
            if value is None:
                continue
            if key not in spec.common:
                raise ValueError(f"{self.tuner} has no {key}; its options: {', '.join(self.option_names())}")
            values[spec.common[key]] = int(value) if key == "r" else value
        for key, text in self.options.items():
            if key not in spec.own:
                raise ValueError(f"{self.name} ({self.tuner}) has no option {key!r}; options: "
                                 f"{', '.join(self.option_names())}")  # fmt: skip
            values[key] = convert_option(key, text, hints[key])
        values.update(spec.fixed)
        return values

    def targets(self) -> list[str]:
        text = TUNERS[self.tuner].defaults["target_modules"] if self.target_modules is None else self.target_modules
        targets = split_targets(text)
        if not targets:
            raise ValueError("target_modules is empty; give a comma list such as qkv or qkv,fc2")
        return targets

    def option_names(self) -> list[str]:
        spec = TUNERS[self.tuner]
        return ["tuner", *(k for k in COMMON if k == "target_modules" or k in spec.common), *spec.own,
                "drop_path_rate", "head_init"]  # fmt: skip

    def peft_config(self, backbone: nn.Module | None = None):
        """The tuner's peft config object (peft checks its own constraints here).

        With `backbone`, the targets become the full names of the Linears they select: peft's suffix matching
        would also wrap other module types (`proj` names the patch embedding's convolution too).
        """
        values = self.settings()
        check_values(self.tuner, values)
        targets: list[str] = self.targets()
        if backbone is not None:
            targets = [name for name, _ in targeted_linears(backbone, targets)]
            if values.get("feedforward_modules"):
                chosen = [name for name, _ in targeted_linears(backbone, values["feedforward_modules"])]
                values["feedforward_modules"] = [name for name in chosen if name in targets]
        init = values.get("init_lora_weights")
        if init is not None and str(init).lower() not in INIT_CHOICES:
            raise ValueError(f"init_lora_weights takes {', '.join(INIT_CHOICES)}: the others rewrite the frozen "
                             f"weights or need data, got {init!r}")  # fmt: skip
        if values.get("boft_n_butterfly_factor", 1) != 1:
            raise ValueError("boft_n_butterfly_factor must be 1: peft builds more factors only with its CUDA "
                             "extension, which the suite does not compile")  # fmt: skip
        try:
            return peft_config_class(self.tuner)(target_modules=targets, **values)
        except (ValueError, TypeError) as e:
            raise ValueError(f"peft refuses this {self.tuner} config: {str(e).splitlines()[0]}") from None

    # -- options from the command line ------------------------------------------------------------------
    def with_options(self, options: dict[str, str]) -> Self:
        """`--set`: the config's fields as usual; any other key is one of the tuner's own options."""
        hints = _checks.type_hints(type(self))
        own_fields = {f.name for f in dataclasses.fields(self)} - {"recipe", "options"}
        changes: dict[str, Any] = {k: parse_option(k, v, hints[k]) for k, v in options.items() if k in own_fields}
        rest = {k: v for k, v in options.items() if k not in own_fields}
        # One replacement, so that options that only make sense together (OFT's r and block size) are checked so.
        return dataclasses.replace(self, **changes, options={**self.options, **rest})

    # -- the contract --------------------------------------------------------------------------------
    def backbone_kwargs(self) -> dict[str, float]:
        return {"drop_path_rate": self.drop_path_rate}

    def check_backbone(self, backbone: VisionTransformer) -> None:
        linears = {name.rsplit(".", 1)[-1] for name, _ in targeted_linears(backbone, ["qkv", "proj", "fc1", "fc2"])}
        for target in self.targets():
            if not targeted_linears(backbone, [target]):
                raise ValueError(f"target_modules {target!r} names no Linear of the backbone; its block Linears: "
                                 f"{', '.join(sorted(linears))}")  # fmt: skip
        values = self.settings()
        block = {"boft": values.get("boft_block_size"), "oft": values.get("oft_block_size")}.get(self.tuner)
        by_count = {"boft": values.get("boft_block_num"), "oft": values.get("r")}.get(self.tuner)
        for name, linear in targeted_linears(backbone, self.targets()):
            size = linear.in_features // by_count if by_count else block
            if block is not None and (not size or linear.in_features % (by_count or size)):
                what = "block count" if by_count else "block size"
                raise ValueError(f"{self.tuner} {what} {by_count or size} does not divide {name}'s {linear.in_features} "
                                 f"input features; pick a divisor")  # fmt: skip

    def create(self, backbone: VisionTransformer, num_classes: int) -> PeftModel:
        return PeftTunerModel(backbone, num_classes, self)

    def expected_params(self, backbone: VisionTransformer, num_classes: int) -> ParamReport:
        return backbone_report(backbone, num_classes, self.tunable_count(backbone))

    def tunable_count(self, backbone: VisionTransformer) -> int:
        """The tuner's parameter formula summed over the targeted Linears (in, out) (only Linears are adapted,
        whatever else a target's suffix names), from peft's shapes:

        - LoRA r·(in + out); DoRA adds a magnitude per output row (+ out); LoHa 2r·(in + out);
        - VeRA r + out (λ_d, λ_b; the shared random projections are frozen buffers);
        - IA³ out (a scale per output), or in for feed-forward modules (a scale per input);
        - BOFT in·b + out (one butterfly factor: in/b blocks of b×b, plus a scale per output);
        - OFT (in/b)·b(b−1)/2 (the strict upper triangle of each skew-symmetric b×b block; one block if shared);
        - LoKr: in = c·d, out = a·b by `lokr_factorization`; the Kronecker factor w1 (a×c) and w2 (b×d) are full,
          or r·(rows + cols) when low-rank (w2: r < max(b, d)/2; w1: with decompose_both, r < max(a, c)/2).
        """
        v, total = self.settings(), 0
        feedforward = set(split_targets(",".join(v.get("feedforward_modules") or [])))
        for name, linear in targeted_linears(backbone, self.targets()):
            i, o = linear.in_features, linear.out_features
            if self.tuner in ("lora", "dora"):
                total += v["r"] * (i + o) + (o if v.get("use_dora") else 0)
            elif self.tuner == "loha":
                total += 2 * v["r"] * (i + o)
            elif self.tuner == "vera":
                total += v["r"] + o
            elif self.tuner == "ia3":
                total += i if any(name == f or name.endswith(f".{f}") for f in feedforward) else o
            elif self.tuner == "boft":
                b = i // v["boft_block_num"] if v.get("boft_block_num") else v["boft_block_size"]
                total += v["boft_n_butterfly_factor"] * i * b + o
            elif self.tuner == "oft":
                b = i // v["r"] if v.get("r") else v["oft_block_size"]
                total += (1 if v.get("block_share") else i // b) * b * (b - 1) // 2
            elif self.tuner == "lokr":
                r, factor = v["r"], v.get("decompose_factor", -1)
                (c, d), (a, b) = lokr_factorization(i, factor), lokr_factorization(o, factor)
                low_w1 = v.get("decompose_both", False) and r < max(a, c) / 2
                low_w2 = r < max(b, d) / 2
                total += (r * (a + c) if low_w1 else a * c) + (r * (b + d) if low_w2 else b * d)
        return total

    @classmethod
    def tiny(cls) -> Self:
        # OFT's default 32-wide blocks do not divide the tiny test backbones' widths (48, 64).
        return cls(options={"oft_block_size": "16"}) if cls.fixed_tuner == "oft" else cls()


class PeftTunerModel(PeftModel):
    """The backbone with peft's tuner layers in place of its targeted Linears, plus the suite's head."""

    def __init__(self, backbone: VisionTransformer, num_classes: int, config: PeftTunerConfig) -> None:
        from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

        super().__init__(backbone, num_classes, head_init=config.head_init)
        peft_config = config.peft_config(backbone)
        if config.tuner == "boft":
            boft_fast_path_only()
        with warnings.catch_warnings():
            # peft suggests `modules_to_save` for the head: the suite's model owns and trains its head itself.
            warnings.filterwarnings("ignore", message=".*modules_to_save.*")
            tuner = PEFT_TYPE_TO_TUNER_MAPPING[peft_config.peft_type](backbone, peft_config, ADAPTER)
        # peft's tuner wraps `self.backbone` (already registered here), so it is kept out of the module tree;
        # it is needed for `merge_and_unload`, and a deep copy of this model copies it with the same backbone.
        self._tuner = (tuner,)

    def tuner_layers(self) -> list[nn.Module]:
        """peft's tuner layers in the backbone (instances of its `BaseTunerLayer`)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [m for m in self.backbone.modules() if isinstance(m, BaseTunerLayer)]

    def tunable_modules(self) -> list[nn.Module]:
        """Each tuner layer's adapter containers, as the layer class declares them (`adapter_layer_names`)."""
        return [getattr(layer, n) for layer in self.tuner_layers() for n in dict.fromkeys(layer.adapter_layer_names)]

    def state_modules(self) -> list[nn.Module]:
        """VeRA's shared random projections when the config saves them (one copy: they are shared by all layers)."""
        if not getattr(self._tuner[0].peft_config[ADAPTER], "save_projection", False):
            return []
        out: dict[int, nn.Module] = {}
        for layer in self.tuner_layers():
            for name in layer.other_param_names:
                value = getattr(layer, name, None)
                if isinstance(value, nn.Module) and value.state_dict():
                    out.setdefault(id(value), value)
        return list(out.values())

    def no_weight_decay_parameters(self) -> list[nn.Parameter]:
        vectors = [p for p in self.tunable_parameters() if sum(s > 1 for s in p.shape) <= 1]
        return [self.head.bias, *vectors]

    def param_report(self) -> ParamReport:
        tunable = self.tunable_parameters()
        ids = {id(p) for p in tunable}
        n = sum(p.numel() for p in tunable)
        return ParamReport(
            tunable=n,
            head=sum(p.numel() for p in self.head.parameters()),
            backbone=sum(p.numel() for p in self.backbone.parameters() if id(p) not in ids),
            nonzero_tunable=n,
        )

    def merged_backbone(self) -> VisionTransformer:
        """peft's `merge_and_unload` on a deep copy: every tuner folded into its base Linear, which replaces it."""
        tuner = copy.deepcopy(self)._tuner[0]
        merged = tuner.merge_and_unload(safe_merge=True)
        if hasattr(merged, "peft_config"):
            del merged.peft_config  # peft's bookkeeping attribute: the result is a plain timm ViT
        return merged.requires_grad_(False)


def _registered(tuner: str, doc: str) -> type[PeftTunerConfig]:
    """`peft_<tuner>`: the generic method with `tuner` fixed and its documented configuration as defaults."""

    cls = dataclasses.make_dataclass(
        f"Peft{tuner.capitalize()}Config",
        [("tuner", str, field(default=tuner))],
        bases=(PeftTunerConfig,),
        namespace={"fixed_tuner": tuner, "__doc__": doc, "__module__": __name__},
    )
    return register_method(f"peft_{tuner}")(cls)


PEFT_DOCS = {
    "lora": "LoRA through peft: r = 8, alpha 8 (scale 1), dropout 0.1 on the fused qkv (294,912 on ViT-B/16).",
    "dora": "DoRA through peft: LoRA r = 8 on qkv plus a magnitude per output row (322,560 on ViT-B/16).",
    "vera": "VeRA through peft: shared frozen random projections, r = 256, trained λ vectors on qkv (30,720).",
    "ia3": "(IA)³ through peft: output scales on qkv, input scales on fc2 (64,512 on ViT-B/16).",
    "boft": "BOFT through peft: block size 4, one butterfly factor, dropout 0.1 on qkv (64,512 on ViT-B/16).",
    "oft": "OFT through peft: 32-wide orthogonal blocks (Cayley) on qkv (142,848 on ViT-B/16).",
    "loha": "LoHa through peft: r = 8, alpha 8, Hadamard product of two rank-8 products on qkv (589,824).",
    "lokr": "LoKr through peft: r = 8, alpha 8, Kronecker factors on qkv (21,504 on ViT-B/16).",
}
REGISTERED = {tuner: _registered(tuner, doc) for tuner, doc in PEFT_DOCS.items()}
