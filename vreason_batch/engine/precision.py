"""IEEE float32 for the engine's matmuls while it decodes, whatever the process's TF32 / bf16 settings.

Why: dV's effect on the logits is small by design, and the last layer's float32 path (last_layer.py,
controller.py) exists to keep it. `torch.set_float32_matmul_precision("high")` lets cuBLAS run
float32 matmuls in TF32 (10 mantissa bits), and "medium" lets oneDNN run them in bf16 on CPUs
with AVX512-BF16 or AMX; either swamps dV's effect. `ieee_float32` holds float32 matmuls and
convolutions at IEEE precision for a whole decode call and gives the caller's settings back after.
It is entered once per call (driver.py), not per matmul, so the step itself flips no global flag.
The settings are process-wide: one decode at a time per process (as in the model actor).
"""

from __future__ import annotations

import contextlib

import torch

# The per-backend settings of torch >= 2.9 that let a float32 matmul, convolution or RNN run in
# TF32 or bf16: cuBLAS, cuDNN and oneDNN (CPU). Older torch has the legacy flags only.
_BACKENDS = (("cuda", "matmul"), ("cudnn", "conv"), ("cudnn", "rnn"), ("mkldnn", "matmul"), ("mkldnn", "conv"),
             ("mkldnn", "rnn"))


def _backend(name: str, op: str):
    return getattr(getattr(torch.backends, name), op)


def _has_per_backend_api() -> bool:
    return hasattr(torch.backends.cuda.matmul, "fp32_precision")


def _legacy_or_none(read):
    try:
        return read()
    except RuntimeError:  # torch refuses a legacy read once legacy and per-backend settings were mixed
        return None


def float32_settings() -> dict:
    """The process's float32 precision settings, as `ieee_float32` saves and restores them."""
    return {
        "matmul_precision": _legacy_or_none(torch.get_float32_matmul_precision),
        "cudnn_allow_tf32": _legacy_or_none(lambda: torch.backends.cudnn.allow_tf32),
        "per_backend": {b: _backend(*b).fp32_precision for b in _BACKENDS} if _has_per_backend_api() else None,
    }


def _restore(saved: dict) -> None:
    # legacy first: it sets the matmul backends too, which the exact per-backend values then override
    if saved["matmul_precision"] is not None:
        torch.set_float32_matmul_precision(saved["matmul_precision"])
    if saved["cudnn_allow_tf32"] is not None:
        torch.backends.cudnn.allow_tf32 = saved["cudnn_allow_tf32"]
    for b, value in (saved["per_backend"] or {}).items():
        _backend(*b).fp32_precision = value


@contextlib.contextmanager
def ieee_float32():
    """Inside: float32 matmuls and convolutions at IEEE precision (no TF32, no bf16). After: the
    caller's settings, exactly as they were (legacy and per-backend), also when the body raises."""
    saved = float32_settings()
    # the legacy setters first, so that legacy reads inside (by the caller's libraries) stay valid
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    if saved["per_backend"] is not None:  # per-backend settings override the legacy ones: set them too
        for b in _BACKENDS:
            _backend(*b).fp32_precision = "ieee"
    try:
        yield
    finally:
        _restore(saved)
