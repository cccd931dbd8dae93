"""The bookkeeping of copying a long chunk's first staging groups ahead of its routing
(engine.experts.streaming); the copies themselves run in tests/engine/test_cuda.py."""

from __future__ import annotations

from engine.experts.streaming import GROUP, ExpertStreamer, adopts_ahead, experts_ahead


def test_the_experts_copied_ahead_are_the_first_uncached_ones():
    cached = {0, 2, 3, 9}
    ahead = experts_ahead(16, cached.__contains__)
    assert ahead == [1, 4, 5, 6, 7, 8, 10, 11][: 2 * GROUP]
    assert experts_ahead(4, cached.__contains__) == [1]  # fewer left than two groups
    assert experts_ahead(4, lambda e: True) == []


def test_copies_ahead_are_adopted_only_when_they_are_the_first_two_groups():
    groups = [[1, 4, 5, 6], [7, 8, 10, 11], [12, 13]]
    first_two = [1, 4, 5, 6, 7, 8, 10, 11]
    assert adopts_ahead((3, first_two), 3, groups)
    assert not adopts_ahead(None, 3, groups)
    assert not adopts_ahead((2, first_two), 3, groups)  # another layer's
    assert not adopts_ahead((3, [1, 4, 5, 6, 7, 8, 10, 12]), 3, groups)  # expert 11 unused
    assert not adopts_ahead((3, first_two[:4]), 3, groups)  # only one group copied
    assert adopts_ahead((0, [9]), 0, [[9]])  # a single short group


def test_the_guess_is_the_streamers_own_first_two_groups():
    """When a chunk uses every expert, what was copied ahead is what the streamer would copy."""
    import torch

    cached = {1: 0, 6: 1}  # expert -> slot
    streamer = ExpertStreamer(None, 0, list(range(20)), cached, torch.float32, None)
    first_two = [e for group in streamer.groups[:2] for e in group]
    assert experts_ahead(20, cached.__contains__) == first_two
    assert adopts_ahead((0, first_two), 0, streamer.groups)
