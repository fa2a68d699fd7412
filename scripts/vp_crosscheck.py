"""Print the VP cross-check table (issue 24): our flow-path samplers and DDIM-eta density
against diffusers' schedulers and DDPO's ``ddim_step_with_logprob``, as max absolute
differences. The comparisons are the tests' own (``tests/test_vp.py``,
``tests/test_tiny_vp.py``); this runs them once and reports the numbers instead of asserting.

    python scripts/vp_crosscheck.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_tiny_vp import tiny_vp_vs_ddim
from test_vp import ddim_eta_vs_ddpo, dpm_vs_diffusers, euler_vs_ddim


def _diff(pair) -> tuple[float, float]:
    """(max |ours - theirs|, max |theirs|): random tiny models give samples far from [-1, 1]."""
    ours, theirs = pair
    return float((ours.double() - theirs.double()).abs().max()), float(theirs.double().abs().max())


def main() -> None:
    rows = []
    for prediction_type in ("epsilon", "v_prediction"):
        for spacing, offset, alpha_one in (("leading", 1, False), ("trailing", 0, True)):
            rows.append((f"Euler on y = DDIMScheduler, eta 0 ({prediction_type}, {spacing}, "
                         f"set_alpha_to_one={alpha_one})", _diff(euler_vs_ddim(prediction_type, spacing, offset,
                                                                                alpha_one)), "float32"))
        rows.append((f"dpm2 on y = DPMSolverMultistepScheduler 2M ({prediction_type})",
                     _diff(dpm_vs_diffusers(prediction_type)), "float32"))
        for guidance in (1.0, 3.0):
            rows.append((f"tiny-vp-unet sampling = DDIMScheduler on its prediction ({prediction_type}, CFG {guidance:g})",
                         _diff(tiny_vp_vs_ddim(prediction_type, guidance)), "float32"))
    for name in ("ddpo sample", "ddpo log-prob", "diffusers sample"):
        diffs = [_diff(ddim_eta_vs_ddpo(eta, index)[name]) for eta in (1.0, 0.3) for index in (0, 4, 9)]
        worst = (max(d for d, _ in diffs), max(m for _, m in diffs))
        what = {"ddpo sample": "DDIM-eta step = DDPO's ddim_step_with_logprob sample",
                "ddpo log-prob": "DDIM-eta log-prob (minus log c') = DDPO's log_prob",
                "diffusers sample": "DDIM-eta step = DDIMScheduler.step(eta, variance_noise)"}[name]
        rows.append((f"{what} (eta 1 and 0.3, steps 0/4/9)", worst, "float32" if "diffusers" in name else "float64"))
    print("| cross-check | max abs difference | largest value compared | precision |")
    print("|---|---|---|---|")
    for what, (diff, scale), precision in rows:
        print(f"| {what} | {diff:.1e} | {scale:.3g} | {precision} |")


if __name__ == "__main__":
    main()
