"""last_layer.py's float32-precision arithmetic over low-precision weights, against float64 references."""

import pytest
import torch

from vreason_batch.engine import last_layer
from vreason_batch.engine.last_layer import hi_lo_gemm, linear32


def _linear(out_f, in_f, dtype, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=bias)
    return lin.to(dtype).requires_grad_(False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear32_is_fp32_exact_over_low_precision_weights(dtype, monkeypatch):
    monkeypatch.setattr(last_layer, "_CHUNK_ELEMENTS", 7 * 64)  # several chunks, the last one short
    lin = _linear(50, 64, dtype)
    x = torch.randn(3, 2, 64, dtype=torch.float32, requires_grad=True)
    ref_x = x.detach().double().requires_grad_(True)
    ref = ref_x @ lin.weight.double().t() + lin.bias.double()
    y = linear32(x, lin)
    assert y.dtype == torch.float32 and y.shape == (3, 2, 50)
    torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=1e-5)
    # the layer in its own dtype is off by ~1e-2 (bf16) / ~6e-4 (fp16): the tolerance above tells them apart
    assert float((lin(x.detach().to(dtype)).double() - ref.detach()).abs().max()) > 1e-4
    g = torch.randn_like(ref)
    (gx,) = torch.autograd.grad((y * g.float()).sum(), x)
    (ref_gx,) = torch.autograd.grad((ref * g).sum(), ref_x)
    torch.testing.assert_close(gx.double(), ref_gx, rtol=1e-6, atol=1e-5)


def test_hi_lo_split_keeps_16_bits():
    # the CUDA path's arithmetic, with the fp32-output GEMM emulated exactly on the CPU
    torch.manual_seed(0)
    w = torch.randn(64, 40).bfloat16()
    x = torch.randn(5, 64) * 30
    out = hi_lo_gemm(x, w, lambda a, b: (a.double() @ b.double()).float())
    ref = x.double() @ w.double()
    scale = float((x.double().abs() @ w.double().abs()).max())
    assert float((out.double() - ref).abs().max()) < 2**-15 * scale
    rounded = (x.bfloat16().double() @ w.double())  # x in bf16 alone: about 8 bits
    assert float((rounded - ref).abs().max()) > 2**-12 * scale


def test_fp32_weights_take_the_plain_path():
    lin = _linear(8, 16, torch.float32)
    x = torch.randn(2, 16)
    assert torch.equal(linear32(x, lin), lin(x))


def _raise(exc):
    def probe():
        raise exc
    return probe


@pytest.mark.parametrize("exc", [TypeError("mm() got an unexpected keyword argument 'out_dtype'"),
                                 NotImplementedError("Could not run 'aten::mm.dtype' with arguments from the 'CUDA' backend")])
def test_a_torch_without_the_fp32_output_gemm_means_not_available(exc):
    assert last_layer.out32_gemm_supported("cuda", torch.bfloat16, _raise(exc)) is False


def test_a_real_error_in_the_gemm_probe_raises():
    with pytest.raises(RuntimeError, match="illegal memory access"):
        last_layer.out32_gemm_supported("cuda", torch.bfloat16, _raise(RuntimeError("CUDA error: an illegal memory access")))


def test_the_fp32_output_gemm_is_for_cuda_and_half_weights_only():
    calls = []
    probe = lambda: calls.append(1)  # noqa: E731
    assert last_layer.out32_gemm_supported("cuda", torch.float16, probe) is True
    assert last_layer.out32_gemm_supported("cuda", torch.bfloat16, probe) is True
    assert not last_layer.out32_gemm_supported("cpu", torch.bfloat16, probe)
    assert not last_layer.out32_gemm_supported("cuda", torch.float32, probe)
    assert calls == [1, 1]  # decided without a probe where the answer is known


def test_an_error_inside_the_fast_gemm_raises_and_keeps_the_fast_path(monkeypatch):
    # the fast path (emulated on the CPU: bf16 operands, fp32 products) serves linear32; an error inside it is
    # an error, and the next call still takes the fast path rather than the chunked upcast
    calls = []

    def gemm(a, w):
        calls.append(a.shape)
        if len(calls) == 2:
            raise RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED")
        return (a.double() @ w.double()).float()

    monkeypatch.setattr(last_layer, "_cuda_gemm_out32", gemm)
    monkeypatch.setattr(last_layer, "_out32_gemm_available", lambda w: True)
    lin = _linear(50, 64, torch.bfloat16, bias=False)
    x = torch.randn(3, 64)
    ref = hi_lo_gemm(x, lin.weight.t(), lambda a, b: (a.double() @ b.double()).float())
    assert torch.equal(linear32(x, lin), ref)
    with pytest.raises(RuntimeError, match="EXECUTION_FAILED"):
        linear32(x, lin)
    assert torch.equal(linear32(x, lin), ref) and len(calls) == 3


def test_availability_is_decided_once_per_device_and_dtype(monkeypatch):
    probes = []
    monkeypatch.setattr(last_layer, "_out32_gemm", {})
    monkeypatch.setattr(last_layer, "out32_gemm_supported", lambda dev, dtype, probe: probes.append(dtype) or False)
    w16, wb16 = torch.zeros(4, 4, dtype=torch.float16), torch.zeros(4, 4, dtype=torch.bfloat16)
    for _ in range(3):
        assert last_layer._mm_out32(torch.zeros(2, 4), w16) is None
        assert last_layer._mm_out32(torch.zeros(2, 4), wb16) is None
    assert probes == [torch.float16, torch.bfloat16]
