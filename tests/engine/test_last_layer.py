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
