"""How to adapt: the method registry, the method contract and one module per method.

Adding a method takes two touches: its file in `methods/` and one import line below.
"""

from methods import baselines  # noqa: F401  (registers linear, full)
from methods._base import MethodConfig, ParamReport, PeftModel, Recipe, TunableModule
from methods._registry import UnknownMethodError, get_method, list_methods, register_method
from methods._vit import vit_param_count

__all__ = [
    "MethodConfig",
    "ParamReport",
    "PeftModel",
    "Recipe",
    "TunableModule",
    "UnknownMethodError",
    "get_method",
    "list_methods",
    "register_method",
    "vit_param_count",
]
