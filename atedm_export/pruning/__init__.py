"""Token pruning, pure torch and export-safe: the methods (AT-EDM, ToMe), their options, apply/remove."""

from .methods import METHODS, PruningOptions, method_of, parse_options
from .options import PruneOptions, ToMeOptions
from .patch import StagePlan, apply_atedm, patched_blocks, planned, remove_atedm, set_plan

__all__ = ["METHODS", "PruneOptions", "PruningOptions", "StagePlan", "ToMeOptions", "apply_atedm", "method_of",
           "parse_options", "patched_blocks", "planned", "remove_atedm", "set_plan"]
