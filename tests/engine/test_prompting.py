"""Frames -> Qwen-VL inputs, checked against transformers' own (PIL-based) Qwen2-VL processor."""

import importlib.util

import numpy as np
import pytest
import torch

from engine_util import tiny_lm
from vreason_batch.engine.models import VisionSpec
from vreason_batch.engine.prompting import (
    build_text_inputs,
    build_video_inputs,
    format_options,
    frames_to_patches,
    patchify,
    smart_resize,
)

SPEC = VisionSpec()


@pytest.mark.parametrize("h,w", [(720, 1280), (272, 640), (144, 176), (30, 2000), (4000, 3000), (28, 28)])
@pytest.mark.parametrize("min_px,max_px", [(3136, 1003520), (128 * 28 * 28, 768 * 28 * 28), (3136, 12544)])
def test_smart_resize_matches_transformers(h, w, min_px, max_px):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    assert smart_resize(h, w, 28, min_px, max_px) == hf_smart_resize(h, w, 28, min_px, max_px)
    rh, rw = smart_resize(h, w, 28, min_px, max_px)
    assert rh % 28 == 0 and rw % 28 == 0


def test_smart_resize_rejects_absurd_aspect():
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 5000)


def _hf_image_patches(img_uint8: np.ndarray):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    out = Qwen2VLImageProcessorPil()(images=[img_uint8], do_resize=False, return_tensors="pt")
    return out["pixel_values"], tuple(out["image_grid_thw"][0].tolist())


@pytest.mark.parametrize("h,w", [(56, 84), (112, 112), (84, 140)])
def test_patchify_matches_hf_processor_on_a_still_frame(h, w):
    # a one-frame video is padded to the temporal patch by repeating the frame: exactly what the
    # image processor does with an image, so the flat patches must be identical
    img = np.random.default_rng(h * w).integers(0, 255, (h, w, 3), dtype=np.uint8)
    ours, grid, size = frames_to_patches(img[None], SPEC, min_pixels=28 * 28, max_pixels=h * w)
    ref, ref_grid = _hf_image_patches(img)
    assert size == (h, w) and grid == ref_grid
    assert torch.allclose(ours, ref.float(), atol=1e-5)


def test_patchify_order_is_temporal_then_merge_windows():
    # pixel value encodes (t, y, x) so the flat layout can be checked exactly
    T, H, W = 4, 56, 56
    t, y, x = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    pix = (t * 10000 + y * 100 + x).float()[:, None].expand(T, 3, H, W)
    patches, (gt, gh, gw) = patchify(pix, SPEC)
    assert (gt, gh, gw) == (2, 4, 4)
    first = patches[0].view(3, 2, 14, 14)  # [C, temporal, p, p]
    assert first[0, 0, 0, 0] == 0 and first[0, 1, 0, 0] == 10000  # frames 0 and 1 share a patch
    # the 2nd patch is the right neighbour inside the first 2x2 merge window
    assert patches[1].view(3, 2, 14, 14)[0, 0, 0, 0] == 14
    # the 3rd patch is the one below the first (still the first merge window)
    assert patches[2].view(3, 2, 14, 14)[0, 0, 0, 0] == 1400
    # the 2nd temporal group starts after all gh*gw patches of the first
    assert patches[gh * gw].view(3, 2, 14, 14)[0, 0, 0, 0] == 20000


def test_odd_frame_count_repeats_last_frame():
    frames = np.random.default_rng(0).integers(0, 255, (3, 56, 56, 3), dtype=np.uint8)
    patches, (gt, gh, gw), _ = frames_to_patches(frames, SPEC, 28 * 28, 56 * 56)
    assert gt == 2
    last = patches[gh * gw:].view(-1, 3, 2, 14, 14)
    assert torch.equal(last[:, :, 0], last[:, :, 1])


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="torchvision not installed (no CPU build here)")
def test_video_patches_match_hf_video_processor():
    from transformers import Qwen2VLVideoProcessor

    frames = np.random.default_rng(1).integers(0, 255, (4, 112, 140, 3), dtype=np.uint8)
    ours, grid, _ = frames_to_patches(frames, SPEC, 28 * 28, 112 * 140)
    ref = Qwen2VLVideoProcessor()(videos=[frames], do_resize=False, return_tensors="pt")
    assert tuple(ref["video_grid_thw"][0].tolist()) == grid
    assert torch.allclose(ours, ref["pixel_values_videos"].float(), atol=1e-4)


def test_video_prompt_has_exact_video_pads_and_chat_format():
    lm = tiny_lm()
    frames = np.random.default_rng(0).integers(0, 255, (6, 84, 140, 3), dtype=np.uint8)
    x = build_video_inputs(lm.tokenizer, lm.vision, frames, 3.0, "Which way does the car turn?", ["left", "right"],
                           "multiple_choice", min_pixels=3136, max_pixels=84 * 140)
    t, h, w = x.video_grid_thw
    assert (t, h, w) == (3, 6, 10)
    assert x.num_video_tokens == t * h * w // 4 == x.input_ids.count(151656)
    assert x.pixel_values_videos.shape == (t * h * w, 3 * 2 * 14 * 14)
    assert x.second_per_grid_t == pytest.approx(2 / 3.0)
    text = lm.tokenizer.decode(x.input_ids)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert "<|vision_start|>" in text and "<|vision_end|>Which way" in text
    assert "A. left\nB. right" in text and "<think>" in text and "<answer>" in text
    # the pads are contiguous, between vision_start and vision_end
    first = x.input_ids.index(151656)
    assert x.input_ids[first - 1] == 151652 and x.input_ids[first + x.num_video_tokens] == 151653


def test_plain_template_and_text_inputs():
    lm = tiny_lm()
    x = build_text_inputs(lm.tokenizer, "What is 2+3?", None, "numerical", "plain")
    text = lm.tokenizer.decode(x.input_ids)
    assert "What is 2+3?" in text and "single number" in text and "<think>" not in text
    assert x.pixel_values_videos is None and x.num_video_tokens == 0


def test_format_options_keeps_existing_letters():
    assert format_options(["cat", "dog"]) == "A. cat\nB. dog"
    assert format_options(["A. cat", "(B) dog"]) == "A. cat\n(B) dog"
