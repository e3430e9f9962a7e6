"""The output lease: one live run per output, taken with create-if-absent writes (local and moto S3)."""

from __future__ import annotations

import threading
import time

import pytest

from vreason_batch.io import storage
from vreason_batch.job.lease import LEASE_DIR, Lease, LeaseHeld, LeaseLost, current_holder


class Clock:
    def __init__(self, t: float = 1_700_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(params=["local", "s3"])
def out(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    return f"s3://{request.getfixturevalue('s3_bucket')}/out"


def test_second_run_is_refused_naming_the_holder(out):
    clock = Clock()
    first = Lease(out, "run-A", ttl_s=60, clock=clock).acquire()
    clock.t += 10
    with pytest.raises(LeaseHeld) as held:
        Lease(out, "run-B", ttl_s=60, clock=clock).acquire()
    msg = str(held.value)
    assert "run run-A" in msg and "started 2023-11-14T22:13:20Z" in msg and "in 50s" in msg, msg
    assert held.value.holder.run_id == "run-A"
    assert current_holder(out, now=clock.t).run_id == "run-A"
    first.renew()  # still ours: no error
    # the lease sits under a path that dataset readers skip
    assert all(f"/{LEASE_DIR}/" in f for f in storage.list_files(out, "*"))


def test_expired_lease_is_taken_over_and_the_old_holder_learns_it(out):
    clock = Clock()
    killed = Lease(out, "run-A", ttl_s=60, clock=clock).acquire()
    clock.t += 61  # run-A's driver was killed: nobody renewed
    assert current_holder(out, now=clock.t) is None
    nxt = Lease(out, "run-B", ttl_s=60, clock=clock).acquire()
    assert nxt.gen == killed.gen + 1 and current_holder(out, now=clock.t).run_id == "run-B"
    with pytest.raises(LeaseHeld, match="run run-B"):
        Lease(out, "run-C", ttl_s=60, clock=clock).acquire()
    # a holder that only stalled finds out at its next renewal or check, and must stop writing
    with pytest.raises(LeaseLost, match="taken over by run run-B"):
        killed.renew()
    with pytest.raises(LeaseLost):
        killed.check()
    # generations older than the one superseded are cleaned up
    clock.t += 61
    Lease(out, "run-D", ttl_s=60, clock=clock).acquire()
    assert len(storage.list_files(storage.join(out, LEASE_DIR), "*.json")) == 2


def test_renewal_keeps_the_lease_and_release_frees_it(out):
    clock = Clock()
    lease = Lease(out, "run-A", ttl_s=60, clock=clock).acquire()
    for _ in range(3):
        clock.t += 45
        lease.renew()  # each renewal pushes the expiry 60 s past now
        lease.check()
    with pytest.raises(LeaseHeld):
        Lease(out, "run-B", ttl_s=60, clock=clock).acquire()
    clock.t += 59
    lease.check()
    clock.t += 2
    with pytest.raises(LeaseLost, match="expired"):
        lease.check()  # not renewed in time: the run must stop even before anyone takes over

    clock.t += 1000
    lease = Lease(out, "run-B", ttl_s=60, clock=clock).acquire()  # takes over run-A's lapsed lease
    lease.release()
    assert current_holder(out, now=clock.t) is None
    assert storage.list_files(out, "*") == []  # a finished run leaves no lease behind, nor the one it took over
    assert Lease(out, "run-C", ttl_s=60, clock=clock).acquire().info.run_id == "run-C"  # no wait


def test_a_lapsed_lease_is_never_renewed_even_when_its_taker_is_gone(out):
    clock = Clock()
    stalled = Lease(out, "run-A", ttl_s=60, clock=clock).acquire()
    clock.t += 61  # run-A stalls past its expiry; run-B takes over, finishes and deletes its lease
    taker = Lease(out, "run-B", ttl_s=60, clock=clock).acquire()
    taker.release()
    assert storage.list_files(out, "*") == []
    with pytest.raises(LeaseLost, match="lapsed"):
        stalled.renew()  # nothing newer is there to see: the lapse alone must stop run-A
    with pytest.raises(LeaseLost):
        stalled.check()
    stalled.release()  # a lost lease is not ours to delete
    assert current_holder(out, now=clock.t) is None


def test_a_renewal_that_fails_to_write_does_not_extend_the_lease(out, monkeypatch):
    clock = Clock()
    lease = Lease(out, "run-A", ttl_s=60, clock=clock).acquire()
    clock.t += 45

    def broken(uri, data):
        raise OSError("storage unreachable")

    monkeypatch.setattr(storage, "write_bytes", broken)
    with pytest.raises(OSError):
        lease.renew()
    clock.t += 16  # past the stored expiry: the run must stop although it tried to renew
    with pytest.raises(LeaseLost, match="expired"):
        lease.check()


def test_renewing_thread_outlives_the_ttl(out):
    ttl = 1.0
    with Lease(out, "run-A", ttl_s=ttl) as lease:
        time.sleep(2.5 * ttl)
        lease.check()
        with pytest.raises(LeaseHeld):
            Lease(out, "run-B", ttl_s=ttl).acquire()
    assert current_holder(out) is None  # released on exit


def test_racing_takeovers_have_one_winner(out):
    clock = Clock()
    Lease(out, "run-old", ttl_s=60, clock=clock).acquire()
    clock.t += 120
    start, won, refused = threading.Barrier(6), [], []

    def attempt(i):
        start.wait()
        try:
            won.append(Lease(out, f"run-{i}", ttl_s=60, clock=clock).acquire().run_id)
        except LeaseHeld as e:
            refused.append(e.holder.run_id)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 5, (won, refused)
    assert set(refused) == set(won) and current_holder(out, now=clock.t).run_id == won[0]


# ---------------------------------------------------------------------------------------------
# The CLI: a held output exits 3 before any cluster work


def test_run_on_a_held_output_exits_3_naming_the_holder(out, tmp_path, capsys, monkeypatch):
    import json

    import ray
    import yaml

    from vreason_batch.cli import EXIT_LEASE_HELD, main

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started although the output is held")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr("vreason_batch.job.pipeline.init_ray", refuse)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "a", "video": "a.mp4", "question": "q"}) + "\n")
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump({"input": {"manifest": str(manifest)}, "output": {"uri": out}}))

    holder = Lease(out, "20261121T010203Z-abcdef", ttl_s=600).acquire()  # a live run, not renewing
    assert main(["run", str(cfg)]) == EXIT_LEASE_HELD
    err = capsys.readouterr().err
    assert err.startswith("vreason-batch: output in use:") and "run 20261121T010203Z-abcdef (started " in err, err
    assert "started " + time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(holder.info.started_at)) in err
    # a dry run only reports the holder
    assert main(["run", str(cfg), "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["held_by_run"] == "20261121T010203Z-abcdef"
    assert not [f for f in storage.list_files(out, "*") if f"/{LEASE_DIR}/" not in f]  # nothing else written
