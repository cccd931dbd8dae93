"""GPU and host memory use, for the model panel."""

from __future__ import annotations

from engine import api


def host_memory() -> tuple[int, int]:
    """(used, total) bytes of host RAM, from /proc/meminfo or psutil."""
    try:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.total - vm.available), int(vm.total)
    except ImportError:
        info = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                info[key] = int(value.split()[0]) * 1024
        return info["MemTotal"] - info.get("MemAvailable", 0), info["MemTotal"]


def resource_usage(request_id: str) -> api.ResourceUsage:
    import torch

    used, total = [], []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, tot = torch.cuda.mem_get_info(i)
            used.append(int(tot - free))
            total.append(int(tot))
    host_used, host_total = host_memory()
    return api.ResourceUsage(request_id, tuple(used), tuple(total), host_used, host_total)
