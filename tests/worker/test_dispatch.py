"""The DP controller's rank choice."""

import pytest

from pdmesh.errors import InvalidArgument
from pdmesh.worker.instance.dispatch import Dispatcher


def test_routed_rank_wins_over_every_method():
    for method in ("round_robin", "shortest_queue", "follow_bootstrap_room"):
        d = Dispatcher(4, method)
        assert d.pick(room=5, routed_dp_rank=0, loads=[9, 0, 0, 0]) == 0
        assert d.pick(room=5, routed_dp_rank=3, loads=[0, 0, 0, 9]) == 3


def test_routed_rank_out_of_range_is_invalid_argument():
    d = Dispatcher(2, "round_robin")
    with pytest.raises(InvalidArgument) as err:
        d.pick(room=1, routed_dp_rank=2, loads=[0, 0])
    assert err.value.reason == "DP_RANK_OUT_OF_RANGE"


def test_follow_bootstrap_room_uses_room_mod_dp_size():
    d = Dispatcher(3, "follow_bootstrap_room")
    assert [d.pick(room=r, routed_dp_rank=None, loads=[0] * 3) for r in (3, 4, 5, 2**63 - 1)] == [0, 1, 2, (2**63 - 1) % 3]


def test_round_robin_cycles():
    d = Dispatcher(3, "round_robin")
    assert [d.pick(1, None, [0, 0, 0]) for _ in range(6)] == [0, 1, 2, 0, 1, 2]


def test_shortest_queue_takes_least_loaded_and_spreads_ties():
    d = Dispatcher(3, "shortest_queue")
    assert d.pick(1, None, [5, 1, 3]) == 1
    picks = {d.pick(1, None, [0, 0, 0]) for _ in range(3)}
    assert picks == {0, 1, 2}


def test_unknown_method_is_rejected():
    with pytest.raises(InvalidArgument):
        Dispatcher(2, "random")


def test_a_restarting_rank_is_passed_over_only_where_the_method_leaves_a_choice():
    for method in ("round_robin", "shortest_queue"):
        d = Dispatcher(3, method)
        picks = [d.pick(1, None, [0, 0, 0], alive=[True, False, True]) for _ in range(6)]
        assert set(picks) == {0, 2}, method
        assert d.pick(1, None, [0, 0, 0], alive=[False, False, False]) in (0, 1, 2)  # none up: any
    d = Dispatcher(2, "follow_bootstrap_room")
    assert d.pick(room=3, routed_dp_rank=None, loads=[0, 0], alive=[True, False]) == 1
    assert Dispatcher(2, "round_robin").pick(room=3, routed_dp_rank=1, loads=[0, 0], alive=[True, False]) == 1
