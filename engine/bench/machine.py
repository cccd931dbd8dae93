"""Probes of the machine the benchmark runs on: GPU, pinned PCIe bandwidth, HBM bandwidth,
CPU model and memory bandwidth, and the CPU's expert-compute rate in each host format."""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch

from engine.experts import int4, nvfp4
from engine.experts.compute import cpu_expert_forward
from engine.experts.store import HOST_FORMATS, requantize_int4, requantize_int8


def _timed(fn, repeats: int = 5) -> float:
    """Median seconds of fn() over repeats (after one warm-up), synchronising CUDA."""
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pcie_bandwidth(num_bytes: int = 256 << 20, device: torch.device | str = "cuda") -> float | None:
    """Pinned host -> GPU copy bandwidth in bytes/s (None without CUDA); each GPU has its own
    link, so the one the layers use is measured (current device: _timed synchronises it)."""
    if not torch.cuda.is_available():
        return None
    with torch.cuda.device(torch.device(device)):
        host = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(num_bytes, dtype=torch.uint8, device=device)
        return num_bytes / _timed(lambda: dev.copy_(host, non_blocking=True))


def hbm_bandwidth(num_bytes: int = 1 << 30) -> float | None:
    """GPU memory bandwidth (read + write of a device copy) in bytes/s."""
    if not torch.cuda.is_available():
        return None
    a = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * num_bytes / _timed(lambda: b.copy_(a))


def cpu_memory_bandwidth(num_bytes: int = 512 << 20) -> float:
    a = torch.empty(num_bytes, dtype=torch.uint8)
    b = torch.empty_like(a)
    return 2 * num_bytes / _timed(lambda: b.copy_(a), repeats=3)


def _probe_experts(hidden: int, width: int, fmt: str, num_experts: int):
    """Random experts at the given shape in a host format: (gate_up, scale, down, scale)."""
    gen = torch.Generator().manual_seed(0)
    gate_up = (torch.randint(0, 256, (num_experts, 2 * width, hidden), generator=gen, dtype=torch.uint8)
               & 0xBF).view(torch.float8_e4m3fn)
    down = (torch.randint(0, 256, (num_experts, hidden, width), generator=gen, dtype=torch.uint8)
            & 0xBF).view(torch.float8_e4m3fn)
    gu_scale = d_scale = torch.full((num_experts,), 0.01)
    if fmt == "int8":
        gate_up, gu_scale = requantize_int8(gate_up, gu_scale)
        down, d_scale = requantize_int8(down, d_scale)
    elif fmt == "int4":  # scales inside the blobs
        gate_up, down = requantize_int4(gate_up, gu_scale), requantize_int4(down, d_scale)
    elif fmt == "nvfp4":  # random codes, E4M3 scales 0.5-1 (bytes 0x30-0x37), divisor 1
        def blobs(rows: int, cols: int) -> torch.Tensor:
            raw = torch.randint(0, 256, (num_experts, rows, nvfp4.blob_width(cols)), generator=gen,
                                dtype=torch.uint8)
            raw[..., cols // 2:] = 0x30 | (raw[..., cols // 2:] & 7)
            return raw.view(nvfp4.BLOB_DTYPE)

        gate_up, down = blobs(2 * width, hidden), blobs(hidden, width)
        gu_scale, d_scale = torch.ones(num_experts, 2 * width), torch.ones(num_experts, hidden)
    return gate_up, gu_scale, down, d_scale


def _cpu_expert_seconds(hidden: int, width: int, dtype: torch.dtype, fmt: str, num_experts: int,
                        num_tokens: int) -> tuple[float, int]:
    """(median seconds for the CPU path to run num_experts experts over num_tokens tokens each,
    the bytes of those experts' weights in the format)."""
    gate_up, gu_scale, down, d_scale = _probe_experts(hidden, width, fmt, num_experts)
    x = torch.randn(num_tokens, hidden).to(dtype)

    def run() -> None:
        for e in range(num_experts):
            cpu_expert_forward(x, gate_up[e], gu_scale[e], down[e], d_scale[e], dtype)

    return _timed(run, repeats=3), gate_up.nbytes + down.nbytes


def cpu_expert_bandwidth(hidden: int, width: int, dtype: torch.dtype, fmt: str = "fp8",
                         num_experts: int = 4) -> float:
    """Bytes of expert weights per second the CPU path consumes for one token, by host format."""
    seconds, num_bytes = _cpu_expert_seconds(hidden, width, dtype, fmt, num_experts, 1)
    return num_bytes / seconds


def cpu_expert_token_rate(hidden: int, width: int, dtype: torch.dtype, fmt: str = "fp8",
                          num_tokens: int = 64, num_experts: int = 2) -> float:
    """Tokens per second through one expert on the CPU path with many tokens at once (where
    compute, not reading the weights, bounds it): what a prefill chunk's expert costs there."""
    seconds, _ = _cpu_expert_seconds(hidden, width, dtype, fmt, num_experts, num_tokens)
    return num_experts * num_tokens / seconds


def describe(hidden: int, width: int, dtype: torch.dtype) -> dict:
    info: dict = {"cpu": cpu_name(), "cpu_threads": torch.get_num_threads(),
                  "cpu_cores": os.cpu_count(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    info["pcie_pinned_bytes_per_s"] = pcie_bandwidth()
    info["hbm_bytes_per_s"] = hbm_bandwidth()
    info["cpu_memory_bytes_per_s"] = cpu_memory_bandwidth()
    formats = [f for f in HOST_FORMATS if f != "int4" or int4.supports_expert(hidden, width)]
    info["cpu_expert_bytes_per_s"] = {fmt: cpu_expert_bandwidth(hidden, width, dtype, fmt)
                                      for fmt in formats}
    info["cpu_expert_tokens_per_s"] = {fmt: cpu_expert_token_rate(hidden, width, dtype, fmt)
                                       for fmt in formats}
    return info
