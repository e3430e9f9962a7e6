"""Fixtures shared by the engine's tests."""

import pytest
from engine_util import tiny_lm


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """The built-in tiny model saved as a regular HF checkpoint (weights, config, tokenizer)."""
    d = tmp_path_factory.mktemp("ckpt")
    lm = tiny_lm()
    lm.model.save_pretrained(d)
    lm.tokenizer.save_pretrained(d)
    return d
