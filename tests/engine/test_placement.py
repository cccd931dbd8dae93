"""Placement planner on real Mistral Small 4 shapes: budgets, splits, mmap, plans that do not fit."""

from __future__ import annotations

import pytest

from engine.errors import InputError
from engine.placement import (
    CONTEXT_STEP,
    DEFAULT_WORKSPACE_BYTES,
    VISION_ACTIVATION_BYTES,
    GiB,
    GpuInfo,
    ModelShape,
    parse_bytes,
    plan_placement,
)

MS4 = ModelShape.for_mistral_small_4()
H100 = GpuInfo(0, "NVIDIA H100 80GB HBM3", 85_520_000_000, 84_900_000_000)
RTX_4090 = [GpuInfo(i, "NVIDIA GeForce RTX 4090", 25_757_220_864, 25_200_000_000) for i in (0, 1)]
RAM_OK = 240 * 10**9


def test_shape_numbers_match_the_docs() -> None:
    assert MS4.expert_bytes == 25_165_824
    assert MS4.num_total_experts == 4608
    assert MS4.host_expert_bytes == 4608 * 25_165_824  # ~116 GB
    assert MS4.kv_bytes_per_token_per_layer * MS4.num_layers == 23_040
    assert MS4.embed_bytes == MS4.lm_head_bytes == 1_073_741_824


def test_shape_from_plain_numbers() -> None:
    numbers = {"num_layers": 4, "num_experts": 8, "experts_per_token": 2, "expert_bytes": 100,
               "dense_bytes_per_layer": 10, "embed_bytes": 5, "lm_head_bytes": 5,
               "kv_bytes_per_token_per_layer": 2}
    shape = ModelShape.from_config(numbers, vision_bytes=7)
    assert (shape.host_expert_bytes, shape.vision_bytes, shape.num_total_experts) == (3200, 7, 32)
    assert ModelShape.from_config(numbers, host_expert_bytes=99).host_expert_bytes == 99
    with pytest.raises(ValueError, match="experts_per_token"):
        ModelShape.from_config(numbers, experts_per_token=9)


@pytest.mark.parametrize(("text", "num_bytes"), [
    ("24GiB", 24 * 2**30), ("24GB", 24 * 10**9), ("512MiB", 512 * 2**20), ("512 MB", 512 * 10**6),
    ("1.5GiB", 3 * 2**29), ("100", 100), ("24g", 24 * 2**30), (7, 7),
])
def test_parse_bytes(text: str | int, num_bytes: int) -> None:
    assert parse_bytes(text) == num_bytes


@pytest.mark.parametrize("text", ["24 parsecs", "", "GiB", "-3GB", "1e3GB"])
def test_parse_bytes_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes(text)


def test_h100_with_24gib_budget() -> None:
    plan = plan_placement(MS4, [H100], host_available_bytes=RAM_OK, context_length=32768,
                          gpu_budget="24GiB")
    assert plan.fits and plan.reasons == ()
    (target,) = plan.targets
    assert (target.device, target.layers) == ("cuda:0", range(36))
    assert target.has_lm_head and target.has_vision
    # 24 GiB - 3.03 GB dense (layers + lm_head; the embeddings and the vision encoder stay in
    # RAM) - 0.75 GB KV - 1.88 GB workspace (it holds the vision encoder and its activations
    # while an image is read) = 20.1 GB = 798 experts of 25.2 MB, the remainder of 798 / 36 on
    # the later layers (they route more narrowly)
    assert target.dense_bytes == 36 * 54_300_000 + 1_073_741_824
    assert target.kv_bytes == 640 * 36 * 32768
    assert target.workspace_bytes == MS4.vision_bytes + VISION_ACTIVATION_BYTES > DEFAULT_WORKSPACE_BYTES
    assert plan.num_expert_slots == 798 and plan.slots_per_layer() == (22,) * 30 + (23,) * 6
    assert target.used_bytes <= 24 * GiB
    assert plan.host_store == "pinned"
    assert plan.summary() == ("fits: 3.0 GB dense + 20 GB expert cache (798 of 4,608 experts) "
                              "+ 0.8 GB KV on GPU 0; 116 GB experts in RAM")


def test_full_context_trades_kv_for_expert_slots() -> None:
    short = plan_placement(MS4, [H100], host_available_bytes=RAM_OK, context_length=32768,
                           gpu_budget="24GiB")
    full = plan_placement(MS4, [H100], host_available_bytes=RAM_OK, context_length=262144,
                          gpu_budget="24GiB")
    assert full.fits
    assert full.targets[0].kv_bytes == 640 * 36 * 262144  # ~6 GB
    kv_growth = full.targets[0].kv_bytes - short.targets[0].kv_bytes
    assert short.num_expert_slots - full.num_expert_slots == -(-kv_growth // MS4.expert_bytes)  # 210


def test_two_24gb_cards_split_layers_in_order() -> None:
    plan = plan_placement(MS4, RTX_4090, host_available_bytes=RAM_OK, context_length=65536)
    first, second = plan.targets
    assert plan.fits
    assert first.layers.start == 0 and first.layers.stop == second.layers.start
    assert second.layers.stop == 36
    assert first.has_vision and not first.has_lm_head
    assert second.has_lm_head and not second.has_vision
    for t in plan.targets:
        assert t.budget_bytes == 25_200_000_000 - GiB  # free minus the default margin
        assert t.used_bytes <= t.budget_bytes
        assert t.kv_bytes == t.num_layers * 640 * 65536
    per_layer = [t.num_expert_slots / t.num_layers for t in plan.targets]
    assert abs(per_layer[0] - per_layer[1]) < 3  # layers split so each layer gets about as many
    assert plan.layer_devices() == ("cuda:0",) * first.num_layers + ("cuda:1",) * second.num_layers
    assert "GPU 0 (layers 0-" in plan.summary() and "GPU 1 (layers" in plan.summary()


def test_cpu_only_plan() -> None:
    plan = plan_placement(MS4, [], host_available_bytes=RAM_OK, context_length=32768)
    (target,) = plan.targets
    assert plan.fits and target.device == "cpu" and target.layers == range(36)
    assert plan.num_expert_slots == 0 and plan.host_store == "pinned"
    assert "on CPU" in plan.summary()
    forced = plan_placement(MS4, [], host_available_bytes=RAM_OK, context_length=32768,
                            expert_slots_per_layer=2)
    assert forced.slots_per_layer() == (2,) * 36


def test_ram_short_means_mmap() -> None:
    plan = plan_placement(MS4, [H100], host_available_bytes=100 * 10**9, context_length=32768,
                          gpu_budget="24GiB")
    assert plan.fits and plan.host_store == "mmap"
    assert any("memory-mapped" in r for r in plan.reasons)
    assert plan.summary().endswith("116 GB experts memory-mapped from disk")
    assert ("disk", "routed experts (memory-mapped)", MS4.host_expert_bytes) in plan.to_parts()
    # Pinned needs the experts + 10% + the safety headroom + the embeddings and vision encoder
    # kept in RAM: just below that is mmap.
    edge = int(MS4.host_expert_bytes * 1.1) + 4 * GiB + MS4.embed_bytes + MS4.vision_bytes
    assert plan_placement(MS4, [H100], host_available_bytes=edge, context_length=4096,
                          gpu_budget="24GiB").host_store == "pinned"
    assert plan_placement(MS4, [H100], host_available_bytes=edge - 1, context_length=4096,
                          gpu_budget="24GiB").host_store == "mmap"


def test_does_not_fit_proposes_a_shorter_context() -> None:
    plan = plan_placement(MS4, [H100], host_available_bytes=RAM_OK, context_length=262144,
                          gpu_budget="8GiB")
    assert not plan.fits
    assert any("exceeds its budget" in r and "GPU 0" in r for r in plan.reasons)
    smaller = plan.smaller_plan
    assert smaller is not None and smaller.fits
    assert 4096 <= smaller.context_length < 262144 and smaller.context_length % CONTEXT_STEP == 0
    # The proposal is the longest such context: one step more does not fit.
    longer = plan_placement(MS4, [H100], host_available_bytes=RAM_OK, gpu_budget="8GiB",
                            context_length=smaller.context_length + CONTEXT_STEP, propose=False)
    assert not longer.fits
    assert plan.summary().startswith("does not fit: GPU 0") and "Try: fits:" in plan.summary()


def test_does_not_fit_proposes_more_gpus() -> None:
    small = [GpuInfo(i, "5 GB card", 5 * GiB, 5 * GiB) for i in (0, 1)]
    plan = plan_placement(MS4, small, host_available_bytes=RAM_OK, context_length=32768,
                          targets=["cuda:0"])
    assert not plan.fits
    assert plan.smaller_plan is not None and len(plan.smaller_plan.targets) == 2
    assert plan.smaller_plan.fits
    assert any("all 2 GPUs" in r for r in plan.reasons)


def test_nothing_fits_says_so() -> None:
    tiny = GpuInfo(0, "2 GB card", 2 * GiB, 2 * GiB)
    plan = plan_placement(MS4, [tiny], host_available_bytes=RAM_OK, context_length=32768)
    assert not plan.fits and plan.smaller_plan is None
    assert "No smaller plan fits" in plan.reasons[-1]


def test_forced_slots_that_do_not_fit_propose_fewer() -> None:
    plan = plan_placement(MS4, [H100], host_available_bytes=RAM_OK, context_length=4096,
                          gpu_budget="24GiB", expert_slots_per_layer=40)
    assert not plan.fits
    assert plan.smaller_plan is not None
    assert plan.smaller_plan.slots_per_layer() == (22,) * 36  # the most that fits 24 GiB


def test_two_targets_on_one_cpu() -> None:
    plan = plan_placement(MS4, [], host_available_bytes=RAM_OK, context_length=8192,
                          targets=["cpu", "cpu"])
    assert plan.fits and [t.device for t in plan.targets] == ["cpu", "cpu"]
    assert [t.layers for t in plan.targets] == [range(0, 18), range(18, 36)]
    assert plan.targets[0].has_vision and plan.targets[1].has_lm_head


def test_two_targets_on_one_gpu_share_its_budget() -> None:
    one = plan_placement(MS4, [H100], host_available_bytes=RAM_OK, context_length=32768,
                         gpu_budget="48GiB")
    two = plan_placement(MS4, [H100], host_available_bytes=RAM_OK, context_length=32768,
                         gpu_budget="48GiB", targets=["cuda:0", "cuda:0"])
    assert two.fits and [t.device for t in two.targets] == ["cuda:0", "cuda:0"]
    assert all(t.budget_bytes == 24 * GiB for t in two.targets)
    assert sum(t.used_bytes for t in two.targets) <= 48 * GiB
    # The second target's workspace costs slots; nothing else is lost.
    assert one.num_expert_slots - two.num_expert_slots == pytest.approx(
        DEFAULT_WORKSPACE_BYTES / MS4.expert_bytes, abs=2)


def test_unknown_gpu_is_an_input_error() -> None:
    with pytest.raises(InputError, match="No GPU 'cuda:3'"):
        plan_placement(MS4, [H100], host_available_bytes=RAM_OK, context_length=4096,
                       targets=["cuda:0", "cuda:3"])


def test_budget_above_free_memory_is_clamped_and_said() -> None:
    plan = plan_placement(MS4, [H100], host_available_bytes=RAM_OK, context_length=4096,
                          gpu_budget="200GB")
    assert plan.fits and plan.targets[0].budget_bytes == H100.free_bytes
    assert any("more than its free" in r for r in plan.reasons)


def test_miss_curves_give_slots_where_they_save_misses() -> None:
    shape = ModelShape.from_config(num_layers=4, num_experts=8, experts_per_token=2,
                                   expert_bytes=10**6, dense_bytes_per_layer=10**6,
                                   embed_bytes=10**6, lm_head_bytes=10**6,
                                   kv_bytes_per_token_per_layer=10)
    steep = [1.0, 0.5, 0.3, 0.2, 0.15, 0.12, 0.1, 0.09, 0.08]  # every slot saves >= 0.01
    flat = [1.0 - c * 0.001 for c in range(9)]
    medium = [1.0, 0.7, 0.65, 0.64, 0.63, 0.62, 0.61, 0.6, 0.59]  # first slot saves 0.3
    gpu = GpuInfo(0, "test", 10**9, 10**9)
    # budget: 5 MB dense (4 layers + lm_head) + 1 MB workspace + 8 slots; KV is tiny
    plan = plan_placement(shape, [gpu], host_available_bytes=RAM_OK, context_length=100,
                          gpu_budget=14 * 10**6 + 4000, workspace_bytes=10**6,
                          miss_curves=[flat, steep, flat, flat])
    assert plan.slots_per_layer() == (0, 8, 0, 0)
    mixed = plan_placement(shape, [gpu], host_available_bytes=RAM_OK, context_length=100,
                           gpu_budget=14 * 10**6 + 4000, workspace_bytes=10**6,
                           miss_curves=[flat, steep, medium, flat])
    # the 8 largest savings: steep .5 .2 .1 .05 .03 .02, medium .3 .05
    assert mixed.slots_per_layer() == (0, 6, 2, 0)
    even = plan_placement(shape, [gpu], host_available_bytes=RAM_OK, context_length=100,
                          gpu_budget=14 * 10**6 + 4000, workspace_bytes=10**6)
    assert even.slots_per_layer() == (2, 2, 2, 2)


def test_to_parts_adds_up_to_the_plan() -> None:
    plan = plan_placement(MS4, RTX_4090, host_available_bytes=RAM_OK, context_length=32768)
    parts = plan.to_parts()
    for t in plan.targets:
        assert sum(n for device, _, n in parts if device == t.device) == t.used_bytes
    assert ("cpu", "routed experts (pinned)", MS4.host_expert_bytes) in parts
    assert ("cpu", "embeddings", MS4.embed_bytes) in parts  # looked up on the host
    assert ("cpu", "vision encoder (copied to the GPU per image)", MS4.vision_bytes) in parts
    assert any(what == "lm_head" and device == "cuda:1" for device, what, _ in parts)
