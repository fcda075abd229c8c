"""How to adapt: the method registry, the method contract and one module per method.

Adding a method takes two touches: its file in `methods/` and one import line below. A method in another package
registers through a `peft_bench.methods` entry point instead (`methods/_plugins.py`), loaded at the end of this file.
"""

# Each import registers the methods its module defines.
from methods import (  # noqa: F401
    adapter,
    adaptformer,
    baselines,
    bitfit,
    convpass,
    difffit,
    e2vpt,
    fact,
    gps,
    lion,
    ln_tune,
    lora,
    lora_adapter,
    mlp3,
    noah,
    partial,
    peft_tuners,
    pgn,
    repadapter,
    sct,
    sidetune,
    spt,
    ssf,
    vpt,
)
from methods._base import (
    CATEGORIES,
    MethodConfig,
    NotMergeableError,
    ParamReport,
    PeftModel,
    PruneCandidate,
    Recipe,
    TunableModule,
)
from methods._family import FAMILIES, Backbone, backbone_param_count, backbone_report, family
from methods._inject import embed, insert_tokens, pool, run_blocks
from methods._registry import (
    UnknownMethodError,
    get_method,
    list_methods,
    load_plugins,
    method_origin,
    register_method,
)
from methods._vit import vit_param_count

__all__ = [
    "CATEGORIES",
    "FAMILIES",
    "Backbone",
    "MethodConfig",
    "NotMergeableError",
    "ParamReport",
    "PeftModel",
    "PruneCandidate",
    "Recipe",
    "TunableModule",
    "UnknownMethodError",
    "backbone_param_count",
    "backbone_report",
    "embed",
    "family",
    "get_method",
    "insert_tokens",
    "list_methods",
    "load_plugins",
    "method_origin",
    "pool",
    "register_method",
    "run_blocks",
    "vit_param_count",
]

# After the built-in methods, so a plugin can neither take one of their names nor be shadowed by one; here, at import,
# so that every process (a worker unpickling a plugin's config) has the plugin's methods registered.
load_plugins()
