"""Loading checkpoints: a saved Qwen2.5-VL directory, the same from an s3:// prefix (moto), once per node."""

import boto3
import pytest
import torch

from engine_util import decode_settings, tiny_lm, video_inputs
from vreason_batch.config import ModelConfig
from vreason_batch.engine.driver import decode_batch
from vreason_batch.engine.loading import load_model


def _greedy(lm, n=8):
    return decode_batch(lm, [video_inputs(0)], decode_settings("greedy", n))[0]


def test_local_checkpoint_loads_as_qwen25vl_and_decodes_the_same(checkpoint):
    lm = load_model(ModelConfig(name_or_path=str(checkpoint)))
    assert type(lm.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert lm.is_vl and lm.vision.video_token_id == 151656 and not lm.is_random_init
    assert lm.dtype == torch.float32 and lm.device.type == "cpu"
    assert 151645 in lm.eos_token_ids
    assert _greedy(lm).token_ids == _greedy(tiny_lm()).token_ids


def test_s3_checkpoint_is_downloaded_once_per_node(checkpoint, s3_bucket, tmp_path):
    s3 = boto3.client("s3")
    for f in checkpoint.iterdir():
        s3.upload_file(str(f), s3_bucket, f"models/tiny/{f.name}")
    cfg = ModelConfig(name_or_path=f"s3://{s3_bucket}/models/tiny", cache_dir=str(tmp_path / "cache"))
    lm = load_model(cfg)
    assert _greedy(lm).token_ids == _greedy(tiny_lm()).token_ids
    cached = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert any(p.name == ".complete" for p in cached) and not any(p.suffix == ".part" for p in cached)
    # a second load must not touch S3: delete the objects, it still loads from the node cache
    for obj in s3.list_objects_v2(Bucket=s3_bucket, Prefix="models/tiny/")["Contents"]:
        s3.delete_object(Bucket=s3_bucket, Key=obj["Key"])
    assert _greedy(load_model(cfg)).token_ids == _greedy(lm).token_ids


def test_missing_s3_checkpoint_is_a_clear_error(s3_bucket, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint files"):
        load_model(ModelConfig(name_or_path=f"s3://{s3_bucket}/nope", cache_dir=str(tmp_path)))


def test_unknown_builtin_and_cuda_without_gpu():
    with pytest.raises(ValueError, match="built-in"):
        load_model(ModelConfig(name_or_path="builtin:giant"))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            load_model(ModelConfig(device="cuda"))
