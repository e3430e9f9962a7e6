"""Frames -> model inputs: smart-resize, Qwen-VL pixel patches, grid, video pads, the chat prompt.

Built without torchvision (which has no CPU build here); tests check the patching against
transformers' PIL-based Qwen2-VL image processor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from vreason_batch.engine.models import VisionSpec

REASONING_SUFFIX = (
    "Think about the question step by step inside <think> </think> tags, "
    "then give the final answer inside <answer> </answer> tags."
)
ANSWER_HINTS = {
    "multiple_choice": "Put only the option letter (e.g. A, B, C) inside <answer> </answer>.",
    "numerical": "Put only the number inside <answer> </answer>.",
    "regression": "Put only the number inside <answer> </answer>.",
    "free_form": "Put a short answer inside <answer> </answer>.",
}
PLAIN_HINTS = {
    "multiple_choice": "Answer with the option's letter from the given choices directly.",
    "numerical": "Answer with a single number.",
    "regression": "Answer with a single number.",
    "free_form": "Answer briefly.",
}

# Video-R1's evaluation prompt (src/r1-v eval_bench.py, as published with the eval_<benchmark>.json
# files): the question, "Options:" and the options as written, a think-then-answer instruction and
# a per-type answer hint. Transcribed from the Video-R1 repository; check it against the version
# you compare with before publishing numbers.
VIDEO_R1_QUESTION = (
    "{question}\nPlease think about this question as if you were a human pondering deeply. Engage in an "
    "internal dialogue using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', 'let's break it "
    "down', etc, or other natural language thought expressions It's encouraged to include self-reflection or "
    "verification in the reasoning process. Provide your detailed reasoning between the <think> </think> tags, "
    "and then give your final answer between the <answer> </answer> tags."
)
VIDEO_R1_HINTS = {
    "multiple_choice": " Please provide only the single option letter (e.g., A, B, C, D, etc.) within the <answer> </answer> tags.",
    "numerical": " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.",
    "regression": " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.",
    "free_form": " Please provide your text answer within the <answer> </answer> tags.",
}
TEMPLATES = ("reasoning", "plain", "video_r1")


@dataclass
class ModelInputs:
    """One sample, ready for the decode loop."""

    input_ids: list[int]
    pixel_values_videos: Any = None  # torch.FloatTensor [n_patches, C * temporal_patch * patch * patch]
    video_grid_thw: tuple[int, int, int] | None = None  # (t, h, w) in patches
    second_per_grid_t: float | None = None  # seconds spanned by one temporal patch
    num_video_tokens: int = 0
    frame_height: int | None = None  # after smart-resize
    frame_width: int | None = None


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """Qwen-VL's rule: both sides multiples of `factor`, area within [min_pixels, max_pixels], aspect kept."""
    if height <= 0 or width <= 0:
        raise ValueError(f"frame size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resize_frames(frames: np.ndarray, height: int, width: int):
    """uint8 [T, H, W, 3] -> float32 torch [T, 3, height, width] in 0..255 (bicubic, antialiased, rounded)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # [T, 3, H, W]
    if x.shape[-2:] != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
        x = x.round().clamp_(0, 255)
    return x


def patchify(pixels, spec: VisionSpec):
    """Normalised [T, 3, H, W] -> (flat patches [t*h*w, 3*tp*p*p], (t, h, w)), in Qwen2-VL's order."""
    import torch

    if pixels.shape[0] % spec.temporal_patch_size:
        # an odd frame count: repeat the last frame, as the HF processor does
        pad = pixels[-1:].expand(spec.temporal_patch_size - pixels.shape[0] % spec.temporal_patch_size, -1, -1, -1)
        pixels = torch.cat([pixels, pad], dim=0)
    T, C, H, W = pixels.shape
    p, tp, m = spec.patch_size, spec.temporal_patch_size, spec.merge_size
    gt, gh, gw = T // tp, H // p, W // p
    x = pixels.reshape(gt, tp, C, gh // m, m, p, gw // m, m, p)
    # -> [gt, gh/m, gw/m, m, m, C, tp, p, p]: merge windows are contiguous, as the vision tower expects
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, C * tp * p * p).contiguous(), (gt, gh, gw)


def frames_to_patches(frames: np.ndarray, spec: VisionSpec, min_pixels: int, max_pixels: int):
    """uint8 frames [T, H, W, 3] -> (patches float32 [N, D], grid (t, h, w), (resized_h, resized_w))."""
    import torch

    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got {frames.shape}")
    h, w = smart_resize(frames.shape[1], frames.shape[2], spec.factor, min_pixels, max_pixels)
    x = resize_frames(frames, h, w) / 255.0
    mean = torch.tensor(spec.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.image_std).view(1, 3, 1, 1)
    x = (x - mean) / std
    patches, grid = patchify(x, spec)
    return patches, grid, (h, w)


def format_options(options: list[str]) -> str:
    """Options as lettered lines; options that already start with 'A.' / '(A)' are kept as written."""
    lines = []
    for i, opt in enumerate(options):
        letter = chr(ord("A") + i)
        text = str(opt).strip()
        head = text[:3].lstrip("(").upper()
        if head.startswith(letter) and len(head) > 1 and head[1] in ".):":
            lines.append(text)
        else:
            lines.append(f"{letter}. {text}")
    return "\n".join(lines)


def user_text(question: str, options: list[str] | None, problem_type: str, template: str) -> str:
    if template == "video_r1":
        body = question.strip()
        if options:
            body += "Options:\n" + "".join(str(o).strip() + "\n" for o in options)
        return VIDEO_R1_QUESTION.format(question=body) + VIDEO_R1_HINTS.get(problem_type, VIDEO_R1_HINTS["free_form"])
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; expected one of {TEMPLATES}")
    body = question.strip()
    if options:
        body += "\nOptions:\n" + format_options(options)
    if template == "reasoning":
        return f"{body}\n{REASONING_SUFFIX} {ANSWER_HINTS.get(problem_type, ANSWER_HINTS['free_form'])}"
    return f"{body}\n{PLAIN_HINTS.get(problem_type, PLAIN_HINTS['free_form'])}"


def qwen_chat(system: str, user: str, video_pads: int, spec: VisionSpec | None) -> str:
    """Qwen2.5-VL's chat template with one video: the same string `apply_chat_template` renders."""
    vision = ""
    if video_pads:
        vision = "<|vision_start|>" + "<|video_pad|>" * video_pads + "<|vision_end|>"
    return (
        f"<|im_start|>system\n{system}<|im_end|>\n"
        f"<|im_start|>user\n{vision}{user}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@dataclass
class VideoPatches:
    """One video's pixel patches, built once and shared by every question on it (read-only)."""

    patches: Any  # torch.FloatTensor [n_patches, C * temporal_patch * patch * patch]
    grid_thw: tuple[int, int, int]  # (t, h, w) in patches
    frame_height: int  # after smart-resize
    frame_width: int


def video_patches(frames: np.ndarray, spec: VisionSpec, min_pixels: int = 128 * 28 * 28,
                  max_pixels: int = 768 * 28 * 28) -> VideoPatches:
    patches, grid, (h, w) = frames_to_patches(frames, spec, min_pixels, max_pixels)
    return VideoPatches(patches, grid, h, w)


def video_question_inputs(
    tokenizer,
    spec: VisionSpec,
    video: VideoPatches,
    sampled_fps: float,
    question: str,
    options: list[str] | None = None,
    problem_type: str = "free_form",
    template: str = "reasoning",
    system_prompt: str = "You are a helpful assistant.",
) -> ModelInputs:
    """One question on a video whose patches are built: the prompt around them (the patches shared, not copied)."""
    gt, gh, gw = video.grid_thw
    n_video = gt * gh * gw // (spec.merge_size**2)
    text = qwen_chat(system_prompt, user_text(question, options, problem_type, template), n_video, spec)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    got = sum(1 for t in ids if t == spec.video_token_id)
    if got != n_video:
        raise RuntimeError(f"tokenizer produced {got} video pads, expected {n_video}")
    fps = sampled_fps if sampled_fps and sampled_fps > 0 else 2.0
    return ModelInputs(
        input_ids=ids,
        pixel_values_videos=video.patches,
        video_grid_thw=(gt, gh, gw),
        second_per_grid_t=spec.temporal_patch_size / fps,
        num_video_tokens=n_video,
        frame_height=video.frame_height,
        frame_width=video.frame_width,
    )


def build_video_inputs(
    tokenizer,
    spec: VisionSpec,
    frames: np.ndarray,
    sampled_fps: float,
    question: str,
    options: list[str] | None = None,
    problem_type: str = "free_form",
    template: str = "reasoning",
    system_prompt: str = "You are a helpful assistant.",
    min_pixels: int = 128 * 28 * 28,
    max_pixels: int = 768 * 28 * 28,
) -> ModelInputs:
    return video_question_inputs(tokenizer, spec, video_patches(frames, spec, min_pixels, max_pixels), sampled_fps,
                                 question, options, problem_type, template, system_prompt)


def build_text_inputs(
    tokenizer,
    question: str,
    options: list[str] | None = None,
    problem_type: str = "free_form",
    template: str = "reasoning",
    system_prompt: str | None = None,
) -> ModelInputs:
    """Text-only prompt through the tokenizer's own chat template (any HF decoder LM)."""
    messages = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": user_text(question, options, problem_type, template)})
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer("\n".join(m["content"] for m in messages) + "\n")["input_ids"]
    return ModelInputs(input_ids=list(ids))


def collate(lm, batch: list[ModelInputs], pixels: bool = True) -> dict:
    """Left-pad prompts into [B, T] tensors on the model's device; concatenate video patches in batch
    order (without `pixels`, only the video grid facts that positions need)."""
    import torch

    dev = lm.device
    T = max(len(b.input_ids) for b in batch)
    ids = torch.full((len(batch), T), lm.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(batch), T), dtype=torch.long)
    for i, b in enumerate(batch):
        ids[i, T - len(b.input_ids):] = torch.tensor(b.input_ids, dtype=torch.long)
        attn[i, T - len(b.input_ids):] = 1
    inputs = {"input_ids": ids.to(dev), "attention_mask": attn.to(dev)}
    has_video = [b.pixel_values_videos is not None for b in batch]
    if any(has_video):
        if not all(has_video):
            raise ValueError("a batch mixes samples with and without video; batch them separately")
        if pixels:
            inputs["pixel_values_videos"] = torch.cat([b.pixel_values_videos for b in batch]).to(dev, lm.dtype)
        inputs["video_grid_thw"] = torch.tensor([b.video_grid_thw for b in batch], dtype=torch.long, device=dev)
        inputs["second_per_grid_ts"] = torch.tensor([b.second_per_grid_t for b in batch], dtype=torch.float32, device=dev)
    return inputs
