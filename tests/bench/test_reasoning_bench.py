"""`bench --workload reasoning`'s actor lifetime: calls fed to one engine against calls that drain."""

from engine_util import decode_settings, tiny_lm, video_inputs


def test_a_lifetime_of_calls_in_flight_keeps_more_slots_busy_with_the_same_outputs():
    from vreason_batch.bench.reasoning import _lifetime
    from vreason_batch.engine.api import Request

    lm = tiny_lm()
    calls = [[Request(f"c{c}-{i}", video_inputs(seed=3 * c + i), ("greedy", "vreason")) for i in range(3)] for c in range(3)]
    s = decode_settings("greedy", 3)
    drained, st_drained, _ = _lifetime(lm, calls, s, 4, 1)
    fed, st_fed, _ = _lifetime(lm, calls, s, 4, 2)
    assert fed.keys() == drained.keys() and len(fed) == 18
    assert all(fed[k].token_ids == drained[k].token_ids for k in fed)
    # 6 rows a call on 4 slots: one at a time, each call ends with 2 slots free; in flight, the next call fills them
    assert st_fed.busy_slot_steps == st_drained.busy_slot_steps
    assert st_fed.occupancy > st_drained.occupancy and st_fed.decode_steps < st_drained.decode_steps
