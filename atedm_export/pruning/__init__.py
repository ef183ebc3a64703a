"""AT-EDM, pure torch and export-safe: G-WPR ranking, static top-k, pruned layers, recovery."""

from .patch import PruneOptions, StagePlan, apply_atedm, patched_blocks, planned, remove_atedm, set_plan

__all__ = ["PruneOptions", "StagePlan", "apply_atedm", "patched_blocks", "planned", "remove_atedm", "set_plan"]
