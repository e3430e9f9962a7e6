"""What a model actor does when a decode call raises: back off on out of memory, leave a bad device, isolate a bad sample.

- Out of memory: the same requests again with half the slots, down to one; then each request
  alone; a request that does not fit alone gets `out_of_memory` rows.
- An error that leaves the device unusable (a CUDA error other than out of memory: an illegal
  memory access, a device-side assert, a lost device): every later call in this process would
  fail too, so nothing is recorded; `DeviceUnusable` is raised and the actor's process exits
  (`exit_for_restart`), so that Ray starts a fresh actor and retries the batch there (bounded
  by `runtime.max_task_retries`: a sample that breaks the device every time fails the run).
- Anything else: each request alone, and the one that fails gets `decode_error` rows.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

log = logging.getLogger(__name__)

# The exit status of an actor that left a device it could not use (Ray restarts the actor).
DEVICE_EXIT_CODE = 75
# Tests: the path of a marker file. Absent: the first model actor to see that creates it with its
# pid and gets a device error on every decode call from then on (a poisoned CUDA context; other
# processes decode normally). Holding "always": every actor does (the run must end, not loop).
ENGINE_FAULT_ENV = "VREASON_BATCH_ENGINE_FAULT"
# Tests: the path of a gate file. Model actors' decode calls wait until it exists (at most
# GATE_MAX_WAIT_S), so that a test can hold the run until the cluster is as it wants.
ENGINE_GATE_ENV = "VREASON_BATCH_ENGINE_GATE"
GATE_MAX_WAIT_S = 300.0

_DEVICE_SIGNS = (
    "illegal memory access", "device-side assert", "unspecified launch failure", "cuda error", "cublas_status",
    "cudnn_status", "ecc error", "gpu is lost", "device lost", "nccl error", "misaligned address",
)


class DeviceUnusable(RuntimeError):
    """The accelerator failed in a way that poisons this process: its rows must be decoded elsewhere."""


def classify(e: BaseException) -> str:
    """'oom', 'device' or 'sample' for what a decode call raised."""
    import torch

    text = str(e).lower()
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text or "can't allocate memory" in text:
        return "oom"
    accel = getattr(torch, "AcceleratorError", ())
    if isinstance(e, accel) or (isinstance(e, RuntimeError) and any(s in text for s in _DEVICE_SIGNS)):
        return "device"
    return "sample"


def free_accelerator_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _attempt(decode: Callable, requests: list, slots: int) -> tuple[dict | None, BaseException | None]:
    """One engine call; a device error raises DeviceUnusable, any other error is returned."""
    try:
        return decode(requests, slots), None
    except Exception as e:  # noqa: BLE001 - classified below
        if classify(e) == "device":
            raise DeviceUnusable(describe(e)) from e
        free_accelerator_memory()
        return None, e


def decode_healing(decode: Callable[[list, int], dict], requests: list, slots: int,
                   failed: BaseException | None = None) -> dict[tuple[Any, str], Any]:
    """`decode(requests, slots)` -> {(key, mode): result}, healed as the module says.

    A failed (key, mode) maps to (error_type, error text). Raises DeviceUnusable. `failed`: what the
    first attempt (these requests on `slots` slots, made elsewhere: feeding.py) raised, not a device error.
    """
    if failed is None:
        out, err = _attempt(decode, requests, slots)
        if out is not None:
            return out
    else:  # what _attempt does after a failure
        err = failed
        free_accelerator_memory()
    log.warning("decoding %d samples on %d slots failed (%s)", len(requests), slots, describe(err))
    while classify(err) == "oom" and slots > 1 and len(requests) > 1:
        slots = max(1, slots // 2)
        out, err = _attempt(decode, requests, slots)
        if out is not None:
            log.warning("out of memory: decoded the %d samples on %d slots", len(requests), slots)
            return out
    out = {}
    for r in requests:
        got, e = _attempt(decode, [r], 1)
        if got is not None:
            out.update(got)
            continue
        kind = "out_of_memory" if classify(e) == "oom" else "decode_error"
        text = describe(e) + (" (alone, on one slot)" if kind == "out_of_memory" else "")
        out.update({(r.key, m): (kind, text) for m in r.modes})
    return out


def exit_for_restart(e: DeviceUnusable) -> None:
    """Leave this process: its device is unusable; Ray restarts the actor and retries the batch."""
    log.error("the accelerator is unusable (%s): this actor exits so that a fresh one decodes its rows", e)
    logging.shutdown()
    os._exit(DEVICE_EXIT_CODE)


def injected_fault() -> None:
    """Tests (ENGINE_FAULT_ENV): raise the device error of a poisoned context where the marker says.
    (ENGINE_GATE_ENV): first wait for the gate file."""
    gate = os.environ.get(ENGINE_GATE_ENV)
    deadline = time.monotonic() + GATE_MAX_WAIT_S
    while gate and not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.1)
    marker = os.environ.get(ENGINE_FAULT_ENV)
    if not marker:
        return
    me = str(os.getpid())
    if not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(me)
    with open(marker) as f:
        holder = f.read()
    if holder in (me, "always"):
        raise RuntimeError("CUDA error: an illegal memory access was encountered (injected by the test)")
