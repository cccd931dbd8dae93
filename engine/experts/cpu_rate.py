"""The CPU path's rate as decode actually sees it, beside the one measured once at load.

The stored profile (engine.experts.profile) is measured with the machine otherwise quiet. In a
decode step the CPU's share runs while the decode thread launches and waits on the GPU, and
whatever else the user runs takes cores too: on the H200 machine the int8 path measured 66 GB/s
quiet, while a step's CPU share waited 1-2.5 ms past the GPU's work. A split made from the quiet
rate then leaves the CPU the straggler every step. So each decode step's CPU job is timed, and
the split uses a moving average of what the jobs achieved.
"""

from __future__ import annotations

from dataclasses import replace

from engine.experts.profile import MachineProfile

# Jobs smaller than this are mostly hand-off overhead, not a rate (a real expert is 13-25 MB).
OBSERVE_MIN_BYTES = 1 << 20
WEIGHT = 0.2  # of the newest job in the moving average: ~5 steps of memory
# How far the observed rate may move the split from the measured one, either way.
LOWEST, HIGHEST = 0.05, 2.0


class CpuRateTracker:
    def __init__(self) -> None:
        self.bytes_per_s: float | None = None  # the moving average; None before any job

    def observe(self, num_bytes: int, seconds: float) -> None:
        """One decode job: num_bytes of expert weights through the CPU path in `seconds`."""
        if num_bytes < OBSERVE_MIN_BYTES or seconds <= 0:
            return
        rate = num_bytes / seconds
        seen = self.bytes_per_s
        self.bytes_per_s = rate if seen is None else seen + WEIGHT * (rate - seen)

    def adjusted(self, profile: MachineProfile) -> MachineProfile:
        """The profile with its CPU rates scaled to what the jobs achieved."""
        if self.bytes_per_s is None or profile.cpu_expert_bytes_per_s <= 0:
            return profile
        factor = min(max(self.bytes_per_s / profile.cpu_expert_bytes_per_s, LOWEST), HIGHEST)
        return replace(profile, cpu_expert_bytes_per_s=profile.cpu_expert_bytes_per_s * factor,
                       cpu_expert_tokens_per_s=profile.cpu_expert_tokens_per_s * factor)
