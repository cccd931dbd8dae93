"""Per-machine rates that decide how misses are split between PCIe copies and CPU compute (a
decode step's, and a short prefill chunk's streamed experts): measured once, stored in the user
cache folder, reused on later loads."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MachineProfile:
    pcie_bytes_per_s: float  # pinned host -> GPU
    cpu_expert_bytes_per_s: float  # expert weights the CPU path consumes per second (1 token)
    cpu_expert_tokens_per_s: float  # tokens per second through one expert, many at once
    key: str


def profile_key(device: torch.device, host_format: str, hidden: int, width: int) -> str:
    """Names the GPU by model and slot: two alike cards can sit on links of different widths."""
    gpu = "cpu"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        slot = ":".join(str(getattr(props, f"pci_{part}_id")) for part in ("domain", "bus", "device")
                        if hasattr(props, f"pci_{part}_id"))
        gpu = f"{props.name} at {slot or device.index}"
    from engine.bench.machine import cpu_name

    if host_format in ("fp8", "nvfp4"):  # the rate depends on whether Quire's CPU kernel built
        from engine.experts.compute import cpu_kernel_for

        kernel = cpu_kernel_for(host_format)
        host_format += f"+{kernel.VERSION}" if kernel is not None else "+pytorch"
    return f"{gpu}|{cpu_name()}|{torch.get_num_threads()} threads|{host_format}|{hidden}x{width}"


def default_profile_path() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("Quire", appauthor=False)) / "machine-profile.json"


def load_or_measure(device: torch.device, host_format: str, hidden: int, width: int,
                    dtype: torch.dtype, path: Path | None = None) -> MachineProfile:
    """The stored profile for this machine and format, measuring it (a second or two) if absent."""
    from engine.bench.machine import cpu_expert_bandwidth, cpu_expert_token_rate, pcie_bandwidth

    path = path or default_profile_path()
    key = profile_key(device, host_format, hidden, width)
    stored: dict = {}
    try:
        stored = json.loads(path.read_text())
        if key in stored:
            return MachineProfile(**stored[key])
    except (OSError, ValueError, TypeError):  # unreadable, or stored by an older version
        stored = {} if not isinstance(stored, dict) else stored
    # The best of two: stored for good, a rate measured while something else held the cores
    # (seen on the H200 machine: int8 at 5.8 GB/s in one run, 66 in the next) would misplace
    # every later split.
    profile = MachineProfile(max(pcie_bandwidth(device=device) or 0.0 for _ in range(2)),
                             max(cpu_expert_bandwidth(hidden, width, dtype, host_format) for _ in range(2)),
                             max(cpu_expert_token_rate(hidden, width, dtype, host_format) for _ in range(2)),
                             key)
    stored[key] = asdict(profile)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(stored, indent=2))
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache folder only costs a re-measure next time
        log.warning("could not store the machine profile: %s", exc)
    return profile
