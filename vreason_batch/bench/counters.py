"""Counting what a piece of torch code does: ATen ops (views and device-waiting ops apart), host reads, decoder-layer calls.

The step bench (step.py) is built on these; tests/bench checks them on toy functions.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter, defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Tensor methods that read a tensor's values on the host (a device sync on a GPU)
HOST_READS = ("item", "tolist", "__bool__", "cpu", "numpy", "__int__", "__float__", "__index__")
# ATen ops that wait for the device on a GPU: a value read on the host, or an output shape that
# depends on values (besides these: boolean-mask indexing, repeat_interleave without output_size)
SYNCING_OPS = frozenset({"aten::_local_scalar_dense", "aten::equal", "aten::allclose", "aten::is_nonzero",
                         "aten::nonzero", "aten::masked_select", "aten::_unique2", "aten::unique_dim",
                         "aten::unique_consecutive", "aten::unique_dim_consecutive"})


class Tally:
    """Counts per region (a name set by the caller; None = not counted): ops, view ops, ops that wait
    for the device, ops inside decoder layers, layer calls, and host reads by method."""

    def __init__(self) -> None:
        self.region: str | None = None
        self.layer_depth = 0
        self.counts: dict[str, Counter] = defaultdict(Counter)

    def add(self, what: str, n: int = 1) -> None:
        if self.region is not None:
            self.counts[self.region][what] += n

    @contextlib.contextmanager
    def counting(self, region: str):
        self.region = region
        try:
            yield
        finally:
            self.region = None


def _syncs(func, args, kwargs) -> bool:
    """Whether this ATen op waits for the device on a GPU (SYNCING_OPS and the two value-dependent cases)."""
    name = func._schema.name
    if name == "aten::index":
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
    if name == "aten::repeat_interleave" and func._overloadname != "self_int":
        return kwargs.get("output_size") is None
    return name in SYNCING_OPS


class OpCounter(TorchDispatchMode):
    """Counts every ATen op dispatched while active into `tally` (views, and ops that wait for the device, apart too)."""

    def __init__(self, tally: Tally) -> None:
        super().__init__()
        self.tally = tally

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.tally.add("ops")
        kwargs = kwargs or {}
        if func.is_view:
            self.tally.add("view_ops")
        if _syncs(func, args, kwargs):
            self.tally.add("sync_ops")
        if self.tally.layer_depth:
            self.tally.add("layer_ops")
            if func.is_view:
                self.tally.add("layer_view_ops")
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_host_reads(tally: Tally):
    """Tensor's HOST_READS methods wrapped to count their calls into `tally` (outermost calls only)."""
    depth = [0]

    def wrap(name, fn):
        @functools.wraps(fn)
        def counted(self, *args, **kwargs):
            if depth[0] == 0:
                tally.add(f"read.{name}")
            depth[0] += 1
            try:
                return fn(self, *args, **kwargs)
            finally:
                depth[0] -= 1
        return counted

    own = {name: torch.Tensor.__dict__.get(name) for name in HOST_READS}  # None: inherited from TensorBase
    for name in HOST_READS:
        setattr(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name)))
    try:
        yield
    finally:
        for name, fn in own.items():
            if fn is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, fn)


@contextlib.contextmanager
def layer_hooks(layers, tally: Tally):
    """Marks the ops that run inside `layers` (decoder layers) and counts their calls."""
    def enter(module, args):
        tally.layer_depth += 1
        tally.add("layer_calls")

    def leave(module, args, output):
        tally.layer_depth -= 1

    handles = [h for layer in layers for h in (layer.register_forward_pre_hook(enter), layer.register_forward_hook(leave))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def stack_layer_hooks(tally: Tally):
    """Marks the ops of the decoder layers engine/stack.py runs itself (no module forward, so no hook
    fires) and counts their calls, as `layer_hooks` does for HF's."""
    from vreason_batch.engine.stack import Stack

    inner = Stack._layer

    def counted(self, *args, **kwargs):
        tally.layer_depth += 1
        tally.add("layer_calls")
        try:
            return inner(self, *args, **kwargs)
        finally:
            tally.layer_depth -= 1

    Stack._layer = counted
    try:
        yield
    finally:
        Stack._layer = inner


@contextlib.contextmanager
def counting(lm, tally: Tally):
    """Ops, host reads and layer calls counted into `tally` (for the regions it names)."""
    with layer_hooks(list(lm.text_model().layers), tally), stack_layer_hooks(tally), count_host_reads(tally), \
            OpCounter(tally):
        yield
