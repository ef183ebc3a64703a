"""Token pruning, pure torch and export-safe: the methods (AT-EDM, ToMe), their options, apply/remove."""

from .methods import METHODS, PruningOptions, method_of, parse_options
from .options import AtedmOptions, ToMeOptions
from .patch import StagePlan, apply_pruning, patched_blocks, planned, remove_pruning, set_plan

__all__ = ["METHODS", "AtedmOptions", "PruningOptions", "StagePlan", "ToMeOptions", "apply_pruning", "method_of",
           "parse_options", "patched_blocks", "planned", "remove_pruning", "set_plan"]
