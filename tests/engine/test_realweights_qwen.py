"""The engine on Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture, the family of Qwen2.5-VL's language
model), from the GGUF that scripts/assemble_gguf.py assembles and checks. Opt-in, outside `make
test`: loading takes about a minute and 4 GB (float32) on 2 cores. Run it with

    python scripts/assemble_gguf.py       # once: prints the checked file's path
    VREASON_QWEN_GGUF=<that path> pytest -m realweights tests/engine/test_realweights_qwen.py

Skipped when VREASON_QWEN_GGUF is unset or names no file. Checks: it loads as a Qwen2 text LM,
greedy answers "17 + 25" correctly, and V-Reason with lr = 0 is greedy token for token (same
entropies) on a left-padded batch of reasoning prompts.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

pytestmark = pytest.mark.realweights

GGUF = os.environ.get("VREASON_QWEN_GGUF", "")
if not GGUF or not os.path.isfile(GGUF):
    pytest.skip("set VREASON_QWEN_GGUF to the GGUF from scripts/assemble_gguf.py", allow_module_level=True)
if importlib.util.find_spec("gguf") is None:
    pytest.skip("needs the gguf package: pip install gguf accelerate", allow_module_level=True)

from engine_util import decode_settings  # noqa: E402
from vreason_batch.config import ModelConfig  # noqa: E402
from vreason_batch.engine.api import DecodeSettings  # noqa: E402
from vreason_batch.engine.driver import decode_batch  # noqa: E402
from vreason_batch.engine.loading import load_model  # noqa: E402
from vreason_batch.engine.prompting import build_text_inputs  # noqa: E402
from vreason_batch.bench.reasoning_set import make_reasoning_set  # noqa: E402

N = 24  # tokens per answer


def settings(mode: str, **ctrl) -> DecodeSettings:
    return decode_settings(mode, N, stop_strings=["</answer>"], **ctrl)


@pytest.fixture(scope="module")
def lm():
    return load_model(ModelConfig(name_or_path=GGUF, device="cpu", dtype="float32"))


@pytest.fixture(scope="module")
def prompts(lm):
    rows = make_reasoning_set(4, seed=0)  # different lengths: the batch is left-padded
    return [build_text_inputs(lm.tokenizer, r["question"], r.get("options"), r["problem_type"], "reasoning")
            for r in rows]


def test_loads_as_qwen2_and_adds(lm):
    assert not lm.is_vl and lm.model.config.model_type == "qwen2"
    x = build_text_inputs(lm.tokenizer, "What is 17 + 25?", None, "numerical", "plain")
    out = decode_batch(lm, [x], settings("greedy"))[0]
    assert "42" in out.output_text, out.output_text


def test_vreason_with_lr0_is_greedy(lm, prompts):
    greedy = decode_batch(lm, prompts, settings("greedy"))
    out = decode_batch(lm, prompts, settings("vreason", lr=0.0, update_every=1))
    for g, v in zip(greedy, out):
        assert v.token_ids == g.token_ids
        assert v.controller_updates > 0
        torch.testing.assert_close(v.entropy, g.entropy, atol=1e-5, rtol=0)
