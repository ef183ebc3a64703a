#!/usr/bin/env python3
"""Calibrate the `paper` schedule's early fraction against the paper's FLOPs budget.

The paper states the saving (38.8% on SDXL at 1024x1024) but not the length of DSAP's early stage.
Given the counted per-step savings of the early stage (S_e) and the main stage (S_m), the early
fraction f that lands the schedule on the budget solves f*S_e + (1 - f)*S_m = target.

    python tools/calibrate_paper.py [--spec sdxl-base-1024] [--target 0.388] [--prune-point layer]

The paper prunes after the first transformer layer (``layer``); that is what the budget is calibrated
at. The default prune point (``attn1``) gives the same output and saves more with the same fraction.
"""

from __future__ import annotations

import argparse

from atedm_export.flops import flops_report
from atedm_export.spec import load_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="sdxl-base-1024")
    parser.add_argument("--target", type=float, default=0.388, help="schedule-average FLOPs saving")
    parser.add_argument("--prune-point", default="layer", choices=["layer", "attn1"])
    args = parser.parse_args()
    report = flops_report(load_spec(args.spec).with_schedule("paper").with_prune_point(args.prune_point))
    early, main_stage = report.stages
    fraction = (main_stage.saving - args.target) / (main_stage.saving - early.saving)
    print(f"baseline {report.baseline_tflops:.3f} TFLOPs/image-step")
    print(f"early stage saving {early.saving:.4f}, main stage saving {main_stage.saving:.4f}")
    print(f"early fraction for a {args.target:.1%} saving: {fraction:.4f}")
    print(f"shipped schedule ({report.steps} steps, early = steps {early.steps[0]}-{early.steps[1] - 1}): "
          f"{report.schedule_tflops:.3f} TFLOPs, {report.schedule_saving:.2%} saved")


if __name__ == "__main__":
    main()
