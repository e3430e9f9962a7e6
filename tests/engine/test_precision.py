"""precision.py: the engine's float32 matmuls stay IEEE whatever the process's matmul precision, which is given back."""

import pytest
import torch

from engine_util import decode_settings, tiny_lm, video_inputs
from vreason_batch.engine import driver, precision
from vreason_batch.engine.driver import decode_batch
from vreason_batch.engine.precision import float32_settings, ieee_float32


@pytest.fixture
def user_settings():
    """Leaves the process's float32 settings as it found them, whatever a test sets."""
    saved = float32_settings()
    yield
    precision._restore(saved)


@pytest.fixture(scope="module")
def samples():
    return [video_inputs(0, 4, 112, 112), video_inputs(1, 6, 84, 140, "How many people are in the room?")]


def _decode(samples, mode):
    s = decode_settings(mode, 8, lr=0.1, update_every=2, rule="always_max")
    return [(r.token_ids, r.entropy, r.entropy_post) for r in decode_batch(tiny_lm(), samples, s)]


def test_results_under_high_and_medium_equal_highest_bit_for_bit(samples, user_settings):
    ref = {mode: _decode(samples, mode) for mode in ("greedy", "vreason")}
    for user in ("high", "medium"):  # "medium": oneDNN may run fp32 matmuls in bf16 (CPUs with AVX512-BF16 / AMX)
        torch.set_float32_matmul_precision(user)
        before = float32_settings()
        for mode in ("greedy", "vreason"):
            assert _decode(samples, mode) == ref[mode], (user, mode)
            assert float32_settings() == before and torch.get_float32_matmul_precision() == user


def test_the_step_runs_at_ieee_precision(samples, user_settings, monkeypatch):
    seen = []
    step = driver.decode_one_token

    def recording(*args):
        seen.append((torch.get_float32_matmul_precision(), float32_settings()["per_backend"]))
        return step(*args)

    monkeypatch.setattr(driver, "decode_one_token", recording)
    torch.set_float32_matmul_precision("medium")
    _decode(samples, "vreason")
    assert len(seen) == 8
    for legacy, per_backend in seen:
        assert legacy == "highest"
        assert per_backend is None or set(per_backend.values()) == {"ieee"}
    assert torch.get_float32_matmul_precision() == "medium"


def test_a_plain_float32_matmul_inside_is_ieee(user_settings):
    # on CPUs with AVX512-BF16 or AMX, "medium" runs it in bf16 outside (about 7e-5 off here)
    torch.manual_seed(0)
    a, b = torch.randn(64, 512), torch.randn(512, 256)
    ref = a @ b
    torch.set_float32_matmul_precision("medium")
    with ieee_float32():
        inside = a @ b
    assert torch.equal(inside, ref)


def test_settings_are_restored_when_the_body_raises(user_settings):
    torch.set_float32_matmul_precision("high")
    before = float32_settings()
    with pytest.raises(ValueError):
        with ieee_float32():
            assert torch.get_float32_matmul_precision() == "highest"
            raise ValueError("inside")
    assert float32_settings() == before


def test_per_backend_settings_are_restored_exactly(user_settings):
    if not precision._has_per_backend_api():
        pytest.skip("torch < 2.9 has the legacy settings only")
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"  # a user of the per-backend API, legacy reads refused
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    before = float32_settings()
    with ieee_float32():
        assert set(float32_settings()["per_backend"].values()) == {"ieee"}
    assert float32_settings() == before
    assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
