"""One engine run on a model actor's slots, fed by every call in flight: no drain at the end of each call.

With `runtime.calls_per_actor` > 1 Ray Data runs that many actor calls at once, each in its own
thread. Each call hands its requests to the actor's `SharedEngine` and waits for its own results;
one engine thread decodes them all on the actor's slots. Whenever slots are free and nothing
waits, the run takes the requests of the calls queued since (`decode_requests`' `more`), so the
next call's rows fill the slots the current call's last rows free; a call returns as soon as its
own rows are done. Each call still gets exactly its own rows, once.

A run that raises: a device error makes every call in it raise DeviceUnusable (nothing recorded;
the actor exits, Ray retries their batches elsewhere). Any other error: each call of the run
whose rows are not all done is healed on its own (healing.py: fewer slots, then each request
alone), as if it had been the only call, so a bad sample never costs another call its rows.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from vreason_batch.job.stages.healing import DeviceUnusable, classify, describe

# run(requests, more, finished): one fed engine run (decode_requests with `more` and `finished`)
Run = Callable[[list, Callable[[], list], Callable[[dict], None]], Any]
# heal(requests, error): the call's requests healed from a failed run's error (decode_healing)
Heal = Callable[[list, BaseException | None], dict]


class _Call:
    def __init__(self, requests: list):
        self.requests = requests
        self.keys = {r.key for r in requests}
        self.left = sum(len(r.modes) for r in requests)
        self.results: dict[tuple[Any, str], Any] = {}
        self.error: BaseException | None = None  # raised in the call's thread: DeviceUnusable, or a bug
        self.done = threading.Event()


class SharedEngine:
    """`decode(requests)` from any thread -> {(key, mode): result or (error_type, error)}; one engine thread."""

    def __init__(self, run: Run, heal: Heal):
        self._run, self._heal = run, heal
        self._cv = threading.Condition()
        self._queue: list[_Call] = []  # calls waiting to join a run
        self._in_run: dict[Any, _Call] = {}  # request key -> its call, for the calls the current run took
        self._thread: threading.Thread | None = None
        self._running = False
        self._taken: list[_Call] = []  # the calls of the current run

    def decode(self, requests: list) -> dict[tuple[Any, str], Any]:
        call = _Call(requests)
        with self._cv:
            self._queue.append(call)
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="vreason-engine", daemon=True)
                self._thread.start()
            self._cv.notify_all()
        call.done.wait()
        if call.error is not None:
            raise call.error
        return call.results

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no run is going and no call waits."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._queue and not self._running, timeout)

    def waiting_calls(self) -> int:
        """Calls queued for the engine that no run has taken yet."""
        with self._cv:
            return len(self._queue)

    # -- the engine thread ------------------------------------------------------------------
    def _serve(self) -> None:
        while True:
            with self._cv:
                while not self._queue:
                    self._cv.wait()
                self._running = True
            self._taken = []
            first = self._take()
            try:
                try:
                    self._run(first, self._take, self._finished)
                except Exception as e:  # noqa: BLE001 - classified below: the calls it cost are healed or fail
                    self._failed(e)
            except BaseException as e:  # noqa: BLE001 - healing itself broke: the open calls raise it, the thread serves on
                for c in self._taken:
                    if c.left > 0 and c.error is None:
                        c.error = e
            finally:
                for c in self._taken:  # a call the engine returned no row for: the stage raises (a bug, not an error row)
                    c.done.set()
                with self._cv:
                    self._in_run.clear()
                    self._running = False
                    self._cv.notify_all()

    def _take(self) -> list:
        """The requests of every queued call whose keys are not in the run already (the next run takes the rest)."""
        out = []
        with self._cv:
            for c in list(self._queue):
                if c.keys.isdisjoint(self._in_run):
                    self._queue.remove(c)
                    self._in_run.update(dict.fromkeys(c.keys, c))
                    self._taken.append(c)
                    out.extend(c.requests)
        if out:  # the run goes on: a call held for its end (see _finished) can return now
            self._release_finished()
        return out

    def _release_finished(self) -> None:
        for c in self._taken:
            if c.left == 0:
                c.done.set()

    def _finished(self, results: dict) -> None:
        for (key, mode), r in results.items():
            c = self._in_run[key]
            c.results[(key, mode)] = r
            c.left -= 1
        # a call whose rows are all done returns now while another call's rows still decode (that call's
        # accounting will hold the run's counts); the run's last call returns once the run has ended and
        # counted them
        if any(c.left for c in self._taken):
            self._release_finished()

    def _failed(self, e: Exception) -> None:
        taken = self._taken
        if classify(e) == "device":
            for c in taken:
                c.error = DeviceUnusable(describe(e))
            return
        fatal: DeviceUnusable | None = None
        for c in [c for c in taken if c.left > 0]:
            if fatal is not None:
                c.error = fatal
                continue
            todo = [r for r in c.requests if any((r.key, m) not in c.results for m in r.modes)]
            alone = len(taken) == 1 and len(todo) == len(c.requests)  # the run was this call's own attempt
            try:
                healed = self._heal(todo, e if alone else None)
            except DeviceUnusable as d:  # the device broke while healing: no later call can use it either
                c.error = fatal = d
                continue
            c.results.update({k: v for k, v in healed.items() if k not in c.results})
