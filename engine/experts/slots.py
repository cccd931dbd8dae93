"""One layer's expert slots on its device: fixed storage in the host format (FP8 as shipped,
int8, int4 or NVFP4), filled from the host store, and the ways a cached expert is computed from it
(the FP8/int8, int4 or NVFP4 kernels, one grouped call for a decode token, or eager
dequantisation).
Glossary: H hidden, I expert width, S slots, n experts of a step.
"""

from __future__ import annotations

import torch

from engine.experts import dequant_kernel, fp8_kernel, int4_kernel, nvfp4, nvfp4_kernel
from engine.experts.compute import dequant_expert, expert_forward
from engine.experts.storage import byte_view, empty_like_format
from engine.experts.store import LayerExperts

KERNEL_FORMATS = {torch.float8_e4m3fn: "fp8", torch.int8: "int8", torch.uint8: "int4",
                  nvfp4.BLOB_DTYPE: "nvfp4"}


class LayerSlots:
    """One layer's expert slots on its device, in the host format (dequantised at use)."""

    def __init__(self, host: LayerExperts, device: torch.device, num_slots: int, first_slot: int) -> None:
        self.host, self.device, self.first_slot = host, device, first_slot
        shape_gu, shape_d = tuple(host.gate_up.shape[1:]), tuple(host.down.shape[1:])
        self.gate_up = empty_like_format((num_slots, *shape_gu), host.gate_up.dtype, device)
        self.down = empty_like_format((num_slots, *shape_d), host.down.dtype, device)
        # Scales live beside the slots: reading one from host memory per use would be a
        # blocking copy for every expert of every layer.
        # fp32 and contiguous, as the kernels read them (no conversion per step).
        self.gate_up_scale = host.gate_up_scale.to(device, torch.float32).contiguous()
        self.down_scale = host.down_scale.to(device, torch.float32).contiguous()
        # int4 blobs carry their scales (the scale tables above are then empty) and have their
        # own kernels, as NVFP4 blobs do (the tables hold their global divisors); the FP8
        # kernels also read int8.
        self.int4 = host.gate_up.dtype == torch.uint8
        self.nvfp4 = host.gate_up.dtype == nvfp4.BLOB_DTYPE
        kernels = int4_kernel if self.int4 else nvfp4_kernel if self.nvfp4 else fp8_kernel
        hidden, width = shape_d[0], shape_gu[0] // 2  # rows of down [H, .] and gate_up [2I, .]
        # Each format's kernel is checked on its own (a GPU without FP8 still runs int8).
        fmt = KERNEL_FORMATS.get(host.gate_up.dtype)
        self.use_kernel = fmt is not None and kernels.kernel_usable(device, hidden, width, fmt)
        if fmt is not None:  # prefill's dequantisation kernel checks itself now, not mid-prompt
            dequant_kernel.kernel_usable(device, fmt)
        # Decode: all of a step's cached experts in two launches.
        self.use_grouped = self.use_kernel and kernels.grouped_kernel_usable(device, hidden, width, fmt)
        # Slot and expert ids of a step go to the GPU from page-locked memory without a
        # blocking copy; one buffer per layer is reused only after the next token's routing
        # wait, by which time its previous copy has long finished.
        pinned = device.type == "cuda"
        # Flat, so a step's ids are one contiguous run (a strided one would be staged through
        # a pageable temporary, a blocking copy).
        self._ids = torch.empty(3 * host.gate_up.shape[0], dtype=torch.int32, pin_memory=pinned)
        self._ids_view = self._ids.numpy()  # filled from Python lists without a temporary tensor

    def fill(self, slot: int, expert: int) -> int:
        """Copy expert's weights from the host store into a slot; returns the bytes moved."""
        local = slot - self.first_slot
        byte_view(self.gate_up[local]).copy_(byte_view(self.host.gate_up[expert]), non_blocking=True)
        byte_view(self.down[local]).copy_(byte_view(self.host.down[expert]), non_blocking=True)
        return self.host.expert_bytes()

    def weights(self, slot: int, expert: int, dtype: torch.dtype):
        """Dequantised (gate_up, down) of a cached expert, or, on GPUs with the FP8 kernel, a
        callable computing the expert straight from the FP8 slot (read when it runs)."""
        local = slot - self.first_slot
        if self.use_kernel and dtype == torch.bfloat16:
            gu, dn = self.gate_up[local], self.down[local]
            gu_s, dn_s = self.gate_up_scale[expert], self.down_scale[expert]

            def compute(xs: torch.Tensor) -> torch.Tensor:
                if xs.shape[0] <= fp8_kernel.MAX_TOKENS and self.int4:
                    return int4_kernel.int4_expert_forward(xs, gu, dn)
                if xs.shape[0] <= fp8_kernel.MAX_TOKENS and self.nvfp4:
                    return nvfp4_kernel.nvfp4_expert_forward(xs, gu, gu_s, dn, dn_s)
                if xs.shape[0] <= fp8_kernel.MAX_TOKENS:
                    return fp8_kernel.fp8_expert_forward(xs, gu, gu_s, dn, dn_s)
                return expert_forward(xs, *dequant_expert(gu, gu_s, dn, dn_s, dtype))

            return compute
        return self.materialize(slot, expert, dtype)

    def grouped(self, x: torch.Tensor, in_slot: dict[int, int], router_row: list[int]
                ) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """Every cached expert of one decode token in one grouped kernel call: (the experts in
        id order, their unweighted outputs [n, 1, H], and each one's column in the router's
        output, int32 on the device, for engine.experts.combine_kernel)."""
        experts = sorted(in_slot)
        n = len(experts)
        self._ids_view[: 3 * n] = ([in_slot[e] - self.first_slot for e in experts] + experts
                                   + [router_row.index(e) for e in experts])
        ids = self._ids[: 3 * n].to(self.device, non_blocking=True).view(3, n)
        if self.int4:
            out = int4_kernel.grouped_int4_expert_forward(x, self.gate_up, self.down, ids[0])
        elif self.nvfp4:
            out = nvfp4_kernel.grouped_nvfp4_expert_forward(x, self.gate_up, self.down, ids[0],
                                                            self.gate_up_scale, self.down_scale, ids[1])
        else:
            out = fp8_kernel.grouped_expert_forward(x, self.gate_up, self.down, ids[0],
                                                    self.gate_up_scale, self.down_scale, expert_ids=ids[1])
        return experts, out, ids[2]

    def materialize(self, slot: int, expert: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The expert's weights copied out of its slot (before the slot is refilled)."""
        local = slot - self.first_slot
        return dequant_expert(self.gate_up[local], self.gate_up_scale[expert],
                              self.down[local], self.down_scale[expert], dtype)
