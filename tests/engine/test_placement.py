"""A model spread over a device map (accelerate, some layers offloaded) decodes as the model in one piece."""

import pytest
import torch
from engine_util import decode_settings, tiny_lm, video_inputs

from vreason_batch.config import ModelConfig, RuntimeConfig
from vreason_batch.engine.driver import decode_batch
from vreason_batch.engine.loading import load_model, tiny_qwen25vl_config
from vreason_batch.engine.modes import MODES
from vreason_batch.engine.placement import Placement, device_map, head_device, head_modules, pin

OFFLOAD_ALL = {"cpu": "1MB"}  # no room for anything: accelerate offloads every layer it may to disk


def _shell():
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration._from_config(tiny_qwen25vl_config(), dtype=torch.float32)


def _decode(lm, mode):
    return decode_batch(lm, [video_inputs(0), video_inputs(1, t=2)], decode_settings(mode, 10))


def test_offloaded_checkpoint_decodes_the_same_tokens_in_every_mode(checkpoint, tmp_path):
    whole = load_model(ModelConfig(name_or_path=str(checkpoint)))
    sharded = load_model(ModelConfig(name_or_path=str(checkpoint)), Placement(max_memory=OFFLOAD_ALL, offload_folder=str(tmp_path)))
    dmap = sharded.model.hf_device_map
    assert dmap["model.language_model.layers.0"] == "disk" and dmap["model.visual"] == "disk"
    text = sharded.text_model()
    assert text.layers[0].mlp.up_proj.weight.device.type == "meta"  # offloaded: loaded by accelerate's hooks per call
    for module in (text.layers[-1], text.norm, sharded.lm_head()):  # the head: real weights on the head device
        assert all(p.device.type == "cpu" for p in module.parameters())
    assert sharded.device == torch.device("cpu")
    for mode in MODES:
        a, b = _decode(whole, mode), _decode(sharded, mode)
        assert [r.token_ids for r in a] == [r.token_ids for r in b], mode
        assert [r.entropy_post for r in a] == [r.entropy_post for r in b], mode
        if MODES[mode].controlled:
            assert all(r.controller_updates > 0 for r in b)


def test_builtin_model_dispatched_over_a_map_decodes_the_same_tokens(tmp_path):
    sharded = load_model(ModelConfig(), Placement(max_memory=OFFLOAD_ALL, offload_folder=str(tmp_path)))
    assert sharded.model.hf_device_map["model.language_model.layers.1"] == "disk"
    for mode in ("greedy", "vreason"):
        assert [r.token_ids for r in _decode(sharded, mode)] == [r.token_ids for r in _decode(tiny_lm(), mode)]


def test_a_model_that_fits_loads_straight_onto_its_device():
    assert device_map(_shell, torch.float32, torch.device("cpu"), Placement()) == {"": "cpu"}
    assert device_map(_shell, torch.bfloat16, torch.device("cuda:1"), Placement()) == {"": 1}


def test_the_head_is_pinned_to_one_device_whatever_the_map():
    from accelerate import init_empty_weights

    with init_empty_weights():
        shell = _shell()
    names = head_modules(shell)
    assert names == ["model.language_model.layers.3", "model.language_model.norm", "lm_head",
                     "model.language_model.embed_tokens"]  # the tiny model ties lm_head to the embeddings
    dmap = pin({"": "disk"}, shell, names, 1)
    for n in names:
        assert dmap[n] == 1
    assert dmap["model.language_model.layers.0"] == "disk" and dmap["model.visual"] == "disk"
    covered = {n for n, _ in shell.named_parameters() if any(n == k or n.startswith(k + ".") for k in dmap)}
    assert covered == {n for n, _ in shell.named_parameters()}  # splitting lost nothing


def test_the_head_device_is_an_accelerator_when_the_last_layer_was_offloaded():
    cuda, last = torch.device("cuda"), "model.layers.3"
    spread = {"model.layers.0": 0, "model.layers.1": 1, "model.layers.2": 1, "model.layers.3": "cpu"}
    assert head_device(spread, last, cuda) == 1
    assert head_device({**spread, "model.layers.3": 0}, last, cuda) == 0
    assert head_device({"model": "disk"}, last, cuda) == 0
    assert head_device({"": "disk"}, last, torch.device("cpu")) == "cpu"


def test_a_sharded_actor_takes_a_whole_number_of_gpus():
    assert RuntimeConfig(num_gpus_per_actor=0.5).num_gpus_per_actor == 0.5
    assert RuntimeConfig(num_gpus_per_actor=4).num_gpus_per_actor == 4
    with pytest.raises(ValueError, match="whole number"):
        RuntimeConfig(num_gpus_per_actor=2.5)
