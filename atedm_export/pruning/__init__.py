"""AT-EDM, pure torch and export-safe: G-WPR ranking, static top-k, pruned layers, recovery."""

from .patch import PruneOptions, StagePlan, apply_atedm, patched_blocks, remove_atedm

__all__ = ["PruneOptions", "StagePlan", "apply_atedm", "patched_blocks", "remove_atedm"]
