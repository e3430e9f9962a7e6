"""Every YAML in configs/ validates; overrides, unknown keys and bad values behave."""

from pathlib import Path

import pytest

from vreason_batch.config import ConfigError, config_from_dict, load_config

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIGS_DIR.rglob("*.yaml"))  # configs/benchmarks/ included
MIN = {"input": {"manifest": "m.jsonl"}, "output": {"uri": "out"}}


def test_there_are_configs():
    assert any(p.name == "demo.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS_DIR)))
def test_every_config_validates(path, monkeypatch):
    monkeypatch.setenv("VIDEO_R1_DATA", "/data/video-r1")  # the benchmark configs' one setting
    cfg = load_config(path)
    assert cfg.decoding.modes and cfg.output.uri


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS_DIR)))
def test_shipped_configs_run_the_papers_method(path, monkeypatch):
    monkeypatch.setenv("VIDEO_R1_DATA", "/data/video-r1")
    c = load_config(path).controller
    assert (c.rule, c.value_norm, c.reset_moments_on_switch) == ("paper", "vector", False)


def test_the_earlier_rule_and_update_still_load():
    c = config_from_dict({**MIN, "controller": {"rule": "switch", "value_norm": "none"}}).controller
    assert (c.rule, c.value_norm) == ("switch", "none")
    with pytest.raises(ConfigError, match="controller.value_norm"):
        config_from_dict(MIN, ["controller.value_norm=l1"])


def test_documented_keys_exist_and_override():
    cfg = config_from_dict(MIN, [
        "input.manifest=s3://b/m.jsonl", "output.uri=s3://b/out", "model.name_or_path=/ckpt",
        "decoding.modes=[greedy, vreason_lite]", "decoding.max_new_tokens=64", "controller.lr=1e-4",
        "controller.update_every=4", "controller.steps_per_update=2", "controller.rule=always_min",
        "video.num_frames=32", "runtime.batch_size=8", "runtime.num_actors=3",
    ])
    assert cfg.input.manifest == "s3://b/m.jsonl" and cfg.model.name_or_path == "/ckpt"
    assert cfg.decoding.modes == ["greedy", "vreason_lite"] and cfg.decoding.max_new_tokens == 64
    assert cfg.controller.lr == 1e-4 and cfg.controller.update_every == 4
    assert cfg.controller.steps_per_update == 2 and cfg.controller.rule == "always_min"
    assert cfg.video.num_frames == 32 and cfg.runtime.batch_size == 8 and cfg.runtime.num_actors == 3


def test_defaults_follow_the_method_notes():
    c = config_from_dict(MIN)
    assert (c.controller.lr, c.controller.update_every, c.controller.steps_per_update) == (1e-3, 2, 1)
    assert (c.controller.ema_beta, c.controller.delta, c.controller.min_explore_tokens) == (0.9, 0.1, 16)
    assert (c.controller.rule, c.controller.value_norm, c.controller.reset_moments_on_switch) == ("paper", "vector", False)
    assert c.lite.prune_ratio == 0.5 and c.decoding.max_new_tokens == 1024


@pytest.mark.parametrize("overrides,needle", [
    (["controller.lrr=1"], "controller.lrr"),
    (["decoding.modes=[beam]"], "decoding.modes"),
    (["controller.update_every=0"], "controller.update_every"),
    (["decoding.modes=[greedy, greedy]"], "duplicates"),
    (["video.min_pixels=999999", "video.max_pixels=1000"], "min_pixels"),
    (["nokey"], "dotted.key=value"),
])
def test_bad_configs_name_the_problem(overrides, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
        config_from_dict(MIN, overrides)


def test_exactly_one_input_source():
    with pytest.raises(ConfigError, match="exactly one"):
        config_from_dict({"input": {}, "output": {"uri": "o"}})


def test_config_hash_ignores_sizing_and_input_but_not_method():
    a = config_from_dict(MIN)
    assert a.config_hash() == config_from_dict(MIN, ["runtime.batch_size=16", "input.manifest=other.jsonl"]).config_hash()
    assert a.config_hash() != config_from_dict(MIN, ["controller.lr=0.5"]).config_hash()


def test_missing_and_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)


@pytest.mark.parametrize(
    "model, text_only",
    [("/models/qwen.gguf", True), ("builtin:smollm2-135m-instruct", True), ("builtin:tiny-qwen2.5-vl", False),
     ("Qwen/Qwen2.5-VL-7B-Instruct", False)],  # a hub id is not looked up: video, as before
)
def test_text_only_follows_the_model_when_unset(model, text_only):
    assert config_from_dict(MIN, [f"model.name_or_path={model}"]).input.text_only is text_only


def test_text_only_from_a_local_checkpoints_config_json(tmp_path):
    import json

    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    (tmp_path / "vl").mkdir()
    (tmp_path / "vl" / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl", "vision_config": {}}))
    assert config_from_dict(MIN, [f"model.name_or_path={tmp_path / 'text'}"]).input.text_only is True
    assert config_from_dict(MIN, [f"model.name_or_path={tmp_path / 'vl'}"]).input.text_only is False
    # an explicit value wins
    explicit = config_from_dict(MIN, [f"model.name_or_path={tmp_path / 'text'}", "input.text_only=false"])
    assert explicit.input.text_only is False


def test_environment_references(monkeypatch):
    data = {"input": {"manifest": "${ROOT_X}/eval.json", "video_root": "${ROOT_X}"}, "output": {"uri": "out"}}
    monkeypatch.setenv("ROOT_X", "s3://bucket/r1")
    cfg = config_from_dict(data)
    assert (cfg.input.manifest, cfg.input.video_root) == ("s3://bucket/r1/eval.json", "s3://bucket/r1")
    monkeypatch.delenv("ROOT_X")
    with pytest.raises(ConfigError, match=r"input.manifest: the config uses \$\{ROOT_X\}; set that environment variable"):
        config_from_dict(data)
    # an override replaces the reference before it is expanded
    assert config_from_dict(data, ["input.manifest=m.jsonl", "input.video_root=/v"]).input.video_root == "/v"
