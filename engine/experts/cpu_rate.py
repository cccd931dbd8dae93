"""The CPU path's speed as the running model actually sees it, beside the rates measured once
at load.

The stored profile (engine.experts.profile) is measured with the machine otherwise quiet. In a
step the CPU's share runs while the thread driving the GPU launches kernels and spins in CUDA's
synchronisations, and whatever else the user runs takes cores too: on the H200 machine the int8
path measured 66 GB/s quiet, while each decode step's CPU share ran 1-2.5 ms past the GPU's
work. A split made from the quiet rates then leaves the CPU the straggler every step. So each
CPU job is timed against what the profile predicts for it, and the splits use the profile's
CPU rates scaled by a moving average of predicted / actual.
"""

from __future__ import annotations

from dataclasses import replace

from engine.experts.profile import MachineProfile

# Jobs predicted shorter than this are mostly hand-off overhead, not a rate (a real decode job,
# one 13-25 MB expert at tens of GB/s, takes ~0.5 ms).
OBSERVE_MIN_SECONDS = 2e-4
WEIGHT = 0.2  # of the newest job in the moving average: ~5 jobs of memory
# How far the jobs may move the split from the measured rates, either way.
LOWEST, HIGHEST = 0.05, 2.0


def predicted_seconds(profile: MachineProfile, expert_bytes: int, token_counts: list[int]) -> float:
    """The profile's time for the CPU path to run experts with these token counts: each reads
    its weights once or computes its tokens, whichever is slower (engine.experts.ceiling)."""
    if profile.cpu_expert_bytes_per_s <= 0 or profile.cpu_expert_tokens_per_s <= 0:
        return 0.0
    return sum(max(expert_bytes / profile.cpu_expert_bytes_per_s, t / profile.cpu_expert_tokens_per_s)
               for t in token_counts)


class CpuRateTracker:
    def __init__(self) -> None:
        self.factor: float | None = None  # moving average of predicted / actual; None before any job

    def observe(self, predicted_s: float, seconds: float) -> None:
        """One job the profile predicted to take predicted_s took `seconds`."""
        if predicted_s < OBSERVE_MIN_SECONDS or seconds <= 0:
            return
        sample = predicted_s / seconds
        self.factor = sample if self.factor is None else self.factor + WEIGHT * (sample - self.factor)

    def adjusted(self, profile: MachineProfile) -> MachineProfile:
        """The profile with its CPU rates scaled to what the jobs achieved."""
        if self.factor is None:
            return profile
        factor = min(max(self.factor, LOWEST), HIGHEST)
        return replace(profile, cpu_expert_bytes_per_s=profile.cpu_expert_bytes_per_s * factor,
                       cpu_expert_tokens_per_s=profile.cpu_expert_tokens_per_s * factor)
