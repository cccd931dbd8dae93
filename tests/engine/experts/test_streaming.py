"""The bookkeeping of copying a long chunk's first staging groups ahead of its routing
(engine.experts.streaming); the copies themselves run in tests/engine/test_cuda.py."""

from __future__ import annotations

from engine.experts.streaming import GROUP, ExpertStreamer, adopted_groups, experts_ahead


def test_the_experts_copied_ahead_are_the_first_uncached_ones():
    cached = {0, 2, 3, 9}
    ahead = experts_ahead(16, cached.__contains__)
    assert ahead == [1, 4, 5, 6, 7, 8, 10, 11][: 2 * GROUP]
    assert experts_ahead(4, cached.__contains__) == [1]  # fewer left than two groups
    assert experts_ahead(4, lambda e: True) == []


def test_copies_ahead_are_kept_where_they_lie_unless_they_miss_a_used_expert():
    missing = [1, 4, 5, 6, 7, 8, 10, 11, 12, 13]
    first_two = [1, 4, 5, 6, 7, 8, 10, 11]
    groups = [[1, 4, 5, 6], [7, 8, 10, 11], [12, 13]]
    assert adopted_groups((3, first_two), 3, missing) == groups
    assert adopted_groups(None, 3, missing) is None
    assert adopted_groups((2, first_two), 3, missing) is None  # another layer's
    assert adopted_groups((3, [1, 4, 5, 6, 7, 8, 10, 12]), 3, missing) is None  # 11 not copied
    assert adopted_groups((3, first_two[::-1]), 3, missing) is None  # not in visiting order
    # Expert 5 copied ahead but not used by this chunk: the copies stay where they lie.
    assert adopted_groups((3, first_two), 3, [e for e in missing if e != 5]) == groups
    # Only one group copied ahead (fewer uncached experts then): the rest follow it.
    assert adopted_groups((3, first_two[:4]), 3, missing) == \
        [[1, 4, 5, 6], [7, 8, 10, 11], [12, 13]]
    assert adopted_groups((0, [9]), 0, [9]) == [[9]]  # a single short group


def test_the_guess_is_the_streamers_own_first_two_groups():
    """When a chunk uses every expert, what was copied ahead is what the streamer would copy."""
    import torch

    cached = {1: 0, 6: 1}  # expert -> slot
    streamer = ExpertStreamer(None, 0, list(range(20)), cached, torch.float32, None)
    first_two = [e for group in streamer.groups[:2] for e in group]
    assert experts_ahead(20, cached.__contains__) == first_two
    missing = [e for e in range(20) if e not in cached]
    assert adopted_groups((0, first_two), 0, missing) == streamer.groups


class FakeStaging:
    """StagingBuffers' events and side stream as a log of what would be queued."""

    def __init__(self, log: list, ahead) -> None:
        self.log, self.ahead = log, ahead
        self.stream = self
        self.free = [Event(log, "free", 0), Event(log, "free", 1)]
        self.ready = [Event(log, "ready", 0), Event(log, "ready", 1)]

    def wait_stream(self, stream) -> None:
        self.log.append("side waits for compute")


class Event:
    def __init__(self, log: list, name: str, i: int) -> None:
        self.log, self.name = log, f"{name}[{i}]"

    def record(self, stream=None) -> None:
        self.log.append(f"record {self.name}")


def test_groups_none_of_whose_experts_are_used_still_pass_their_buffer_on(monkeypatch):
    """Group 1 copied ahead but unused: leaving group 0 for group 2 still issues group 3's copy
    (into buffer 1) and waits for the right events; a missing step would read a stale buffer."""
    import torch

    from engine.experts import streaming

    log: list = []
    monkeypatch.setattr(streaming, "_copy_group", lambda b, host, experts, g: log.append(f"copy {g} {experts}"))
    compute = type("Compute", (), {"wait_event": lambda self, e: log.append(f"compute waits {e.name}")})()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    ahead = [0, 1, 2, 3, 4, 5, 6, 7]
    buffers = FakeStaging(log, (0, ahead))
    buffers.gate_up = torch.empty(0)
    slots = type("Slots", (), {"host": type("Host", (), {"expert_bytes": lambda self: 1})()})()
    used = [0, 1, 2, 3, 8, 9, 10, 11, 12]  # none of group 1 (4..7)
    streamer = ExpertStreamer(slots, 0, used, {}, torch.float32, buffers)
    assert streamer.adopted and streamer.groups == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12]]
    assert log == []  # both first groups came ahead
    streamer._enter_group(0)
    streamer._enter_group(2)
    assert log == ["compute waits ready[0]",
                   "record free[0]", "copy 2 [8, 9, 10, 11]", "compute waits ready[1]",
                   "record free[1]", "copy 3 [12]", "compute waits ready[0]"]
