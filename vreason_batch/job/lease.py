"""One run per output at a time: a lease object with an expiry, renewed by the driver.

A retried nightly run that overlaps the first would otherwise plan the same pending rows and do
all the work twice. The lease lives next to the data, in generations:

    <output.uri>/_lease/<generation>.json     {"run_id", "started_at", "expires_at", ...}

The highest generation is the current lease. A run takes the lease by creating generation G+1
with a create-if-absent write (S3: `If-None-Match: *`; local: link()), which exactly one racer
wins, and only when generation G is expired (or absent). The holder rewrites its own generation
to push `expires_at` forward (a daemon thread, every ttl/4); a driver that is killed stops
renewing, its lease expires after `ttl_s`, and the next run takes over. A holder whose lease
lapsed (it stalled past its expiry) has lost it, whether or not a higher generation is there,
and must stop writing. A run that ends deletes its generation and those before it, so a
finished run leaves no lease behind (generation numbers then start again at 1).

Expiry compares the holder's clock with the reader's: keep `runtime.lease_ttl_s` well above the
clock skew between the machines that may run drivers.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone

from vreason_batch.io import storage

log = logging.getLogger(__name__)

LEASE_DIR = "_lease"  # the leading underscore makes dataset readers skip it
_GENERATION = re.compile(r"^(\d{12})\.json$")
RENEWALS_PER_TTL = 4
ACQUIRE_ATTEMPTS = 5  # a lease released (deleted) between a listing and its read: look again


class LeaseHeld(RuntimeError):
    """Another live run holds the output."""

    def __init__(self, uri: str, holder: "LeaseInfo", now: float):
        self.holder = holder
        super().__init__(
            f"{uri} is held by run {holder.run_id} (started {_iso(holder.started_at)} on {holder.host}, "
            f"pid {holder.pid}; lease renewed {_iso(holder.renewed_at)}, expires {_iso(holder.expires_at)}, "
            f"in {max(0.0, holder.expires_at - now):.0f}s unless renewed). Wait for it to finish, or use "
            f"another output.uri; a killed run's lease expires by itself."
        )


class LeaseLost(RuntimeError):
    """This run's lease was taken over by another run (it was not renewed in time)."""


@dataclass
class LeaseInfo:
    run_id: str
    token: str  # random per acquisition: tells our own lease from a same-named one
    host: str
    pid: int
    started_at: float  # epoch seconds, the holder's clock
    renewed_at: float
    expires_at: float
    released: bool = False  # written by earlier versions, which kept a released lease; now it is deleted

    def live(self, now: float) -> bool:
        return not self.released and self.expires_at > now

    def to_bytes(self) -> bytes:
        return json.dumps({**asdict(self), "started_at_utc": _iso(self.started_at)}, indent=1).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "LeaseInfo":
        d = json.loads(data)
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _generations(uri: str) -> list[int]:
    d = storage.join(uri, LEASE_DIR)
    if not storage.exists(d):
        return []
    gens = []
    for f in storage.list_files(d, "*.json"):
        m = _GENERATION.match(f.rsplit("/", 1)[-1])
        if m:
            gens.append(int(m.group(1)))
    return sorted(gens)


def _path(uri: str, gen: int) -> str:
    return storage.join(uri, LEASE_DIR, f"{gen:012d}.json")


def current_holder(uri: str, now: float | None = None) -> LeaseInfo | None:
    """The run holding `uri` now, or None (no lease, or the last one expired or was released)."""
    for attempt in range(ACQUIRE_ATTEMPTS):
        gens = _generations(uri)
        if not gens:
            return None
        try:
            info = LeaseInfo.from_bytes(storage.read_bytes(_path(uri, gens[-1])))
        except storage.NotFound:  # released between the listing and the read: look again
            if attempt == ACQUIRE_ATTEMPTS - 1:
                raise
            continue
        return info if info.live(time.time() if now is None else now) else None
    raise AssertionError("unreachable")


class Lease:
    """The lease on one output location, held by one run. Use `acquire`, then `release` (or `with`)."""

    def __init__(self, uri: str, run_id: str, ttl_s: float, clock=time.time):
        self.uri, self.run_id, self.ttl_s, self.clock = uri, run_id, float(ttl_s), clock
        self.gen: int | None = None
        self.info: LeaseInfo | None = None
        self.lost: str | None = None  # why the lease was lost, once it is
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- taking it ----------------------------------------------------------------------------
    def acquire(self) -> "Lease":
        """Take the lease, or raise LeaseHeld naming the live holder. Starts no thread (see `start_renewing`)."""
        for attempt in range(ACQUIRE_ATTEMPTS):
            try:
                return self._acquire_once()
            except storage.NotFound:
                # the generation we had just listed was released (deleted) before we read it
                if attempt == ACQUIRE_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def _acquire_once(self) -> "Lease":
        now = self.clock()
        gens = _generations(self.uri)
        top = gens[-1] if gens else 0
        if gens:
            holder = LeaseInfo.from_bytes(storage.read_bytes(_path(self.uri, top)))
            if holder.live(now):
                raise LeaseHeld(self.uri, holder, now)
            log.warning("taking over the lease on %s from run %s (%s)", self.uri, holder.run_id,
                        "released" if holder.released else f"expired {_iso(holder.expires_at)}")
        info = LeaseInfo(
            run_id=self.run_id, token=secrets.token_hex(8), host=socket.gethostname(), pid=os.getpid(),
            started_at=now, renewed_at=now, expires_at=now + self.ttl_s,
        )
        gen = top + 1
        try:
            storage.write_bytes_if_absent(_path(self.uri, gen), info.to_bytes())
        except storage.AlreadyExists:
            # Another run created this generation first; or our own write landed and only its
            # reply was lost, so a retry of it found it there: the token tells which.
            winner = LeaseInfo.from_bytes(storage.read_bytes(_path(self.uri, gen)))
            if winner.token != info.token:
                raise LeaseHeld(self.uri, winner, now) from None
        self.gen, self.info = gen, info
        for old in gens[:-1]:  # keep the one just superseded: it says who held the output before
            storage.delete_prefix(_path(self.uri, old))
        return self

    # -- keeping it ---------------------------------------------------------------------------
    def renew(self) -> None:
        """Push the expiry forward; raise LeaseLost when the lease lapsed or another run took it.

        A lease that lapsed is never renewed, even when no later generation is there: the run that
        took it over may have finished and released (deleted) it since.
        """
        assert self.info is not None and self.gen is not None, "renew() before acquire()"
        if self.lost:
            raise LeaseLost(self.lost)
        lapsed = f"the lease on {self.uri} lapsed at {_iso(self.info.expires_at)} before this run renewed it"
        newer = [g for g in _generations(self.uri) if g > self.gen]
        if newer:
            try:
                taker = f"run {LeaseInfo.from_bytes(storage.read_bytes(_path(self.uri, newer[-1]))).run_id}"
            except storage.NotFound:  # that run already released it
                taker = "another run"
            self.lost = f"the lease on {self.uri} was taken over by {taker} (this run's lease expired)"
            raise LeaseLost(self.lost)
        now = self.clock()
        if now > self.info.expires_at:
            self.lost = lapsed
            raise LeaseLost(self.lost)
        # written first, kept only once stored: a failed write must not extend what `check` trusts
        renewed = replace(self.info, renewed_at=now, expires_at=now + self.ttl_s)
        storage.write_bytes(_path(self.uri, self.gen), renewed.to_bytes())
        if self.clock() > self.info.expires_at:  # the write stalled past the expiry: too late
            self.lost = lapsed
            raise LeaseLost(self.lost)
        self.info = renewed

    def check(self) -> None:
        """Raise LeaseLost when the renewing thread found the lease gone, or it lapsed unrenewed."""
        if self.lost is None and self.info is not None and self.clock() > self.info.expires_at:
            self.lost = f"the lease on {self.uri} expired at {_iso(self.info.expires_at)} without a renewal"
        if self.lost:
            raise LeaseLost(self.lost)

    def start_renewing(self) -> None:
        """Renew every ttl/4 on a daemon thread until `release`."""
        self._thread = threading.Thread(target=self._renew_loop, name="vreason-lease", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / RENEWALS_PER_TTL):
            try:
                self.renew()
            except LeaseLost as e:
                log.error("%s", e)
                return
            except OSError as e:  # storage trouble: retried at the next tick, lost only at expiry
                log.warning("renewing the lease on %s failed: %s", self.uri, e)

    # -- giving it back -----------------------------------------------------------------------
    def release(self) -> None:
        """Delete the lease (ours and the generations before it), so the next run need not wait."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.info is None or self.lost:
            return
        try:
            gens = _generations(self.uri)
            if gens and gens[-1] == self.gen:
                # ours last: until it goes, readers still find it the live top generation
                for g in gens:
                    storage.delete_prefix(_path(self.uri, g))
        except OSError as e:  # the lease then expires by itself
            log.warning("releasing the lease on %s failed: %s", self.uri, e)

    def __enter__(self) -> "Lease":
        if self.info is None:
            self.acquire()
        self.start_renewing()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
