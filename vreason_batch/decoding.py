"""The one decode loop: greedy / vreason / vreason_lite, batched over the KV cache, with traces.

How V-Reason is made cheap here (see VREASON.md): dV only touches the LAST layer's value cache, so
only the last layer + final norm + lm_head depend on it. A forward pre-hook on the last decoder
layer keeps its input for the current position (no grad). An update re-runs just that layer on
that one position with the cached keys and `base + dV` values (through a tiny stand-in for the
cache object), backpropagates the entropy into dV, steps Adam, and re-runs the layer once more for
the post-update logits. No graph outlives an update; earlier layers never see a gradient.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .config import ControllerConfig
from .controller import ControllerState, PolicyState, adam_step, entropy_from_logits, policy_step
from .models import LoadedModel
from .prompting import ModelInputs

MODES = ("greedy", "vreason", "vreason_lite")


@dataclass
class DecodeSettings:
    mode: str = "greedy"
    max_new_tokens: int = 1024
    stop_strings: list[str] = field(default_factory=lambda: ["</answer>"])
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    prune_ratio: float = 0.5

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown decoding mode {self.mode!r}; known: {MODES}")


@dataclass
class DecodeResult:
    token_ids: list[int]
    text: str
    finish_reason: str  # eos | stop_string | max_new_tokens
    entropy: list[float]  # H_t before the update, one per output token
    entropy_post: list[float]  # entropy of the logits the token was chosen from (after the update)
    entropy_ema: list[float]
    alpha: list[int]  # 0 where no update was made
    controller_updates: int
    ema_peak_step: int | None
    num_prompt_tokens: int
    num_video_tokens: int
    num_video_tokens_kept: int
    num_output_tokens: int
    num_think_tokens: int
    latency_s: float  # from the batch's start to this sample's last token (prefill included)


class _LastLayerInput:
    """Forward pre-hook on the last decoder layer: keeps its inputs at the LAST position only."""

    def __init__(self) -> None:
        self.hidden = None  # [B, 1, D]
        self.kwargs: dict = {}

    def __call__(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.hidden = hidden[:, -1:, :].detach()
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 4:
            mask = mask[:, :, -1:, :]  # [B, 1, 1, KV]: the last query row
        pe = kwargs.get("position_embeddings")
        if pe is not None:
            pe = tuple(x[..., -1:, :] for x in pe)  # cos/sin [..., 1, head_dim]
        pos = kwargs.get("position_ids")
        if pos is not None:
            pos = pos[..., -1:]
        self.kwargs = {"attention_mask": mask, "position_embeddings": pe, "position_ids": pos}
        return None


class _FixedKV:
    """Stands in for the cache during a last-layer re-run: returns the full cached K and the given V."""

    def __init__(self, keys, values) -> None:
        self.keys, self.values = keys, values

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        # the current position's k/v are already in the cache (appended by the main forward)
        return self.keys, self.values


def _collate(lm: LoadedModel, batch: list[ModelInputs]):
    """Left-pad prompts; concatenate video patches in batch order."""
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
        inputs["pixel_values_videos"] = torch.cat([b.pixel_values_videos for b in batch]).to(dev, lm.dtype)
        inputs["video_grid_thw"] = torch.tensor([b.video_grid_thw for b in batch], dtype=torch.long, device=dev)
        inputs["second_per_grid_ts"] = torch.tensor([b.second_per_grid_t for b in batch], dtype=torch.float32, device=dev)
    return inputs


def _position_ids(lm: LoadedModel, inputs: dict):
    """Prompt positions exactly as HF generate builds them: [4, B, T] (text + 3D mrope) for Qwen-VL, else [B, T]."""
    import torch

    attn = inputs["attention_mask"]
    text = (attn.cumsum(-1) - 1).masked_fill(attn == 0, 0)  # [B, T]
    if not lm.is_vl:
        return text
    if "video_grid_thw" in inputs:
        mm_types = _video_selector(lm, inputs).int() * 2  # 2 = video
        vision, _ = lm.model.model.get_rope_index(
            inputs["input_ids"],
            mm_token_type_ids=mm_types,
            video_grid_thw=inputs["video_grid_thw"],
            second_per_grid_ts=inputs["second_per_grid_ts"],
            attention_mask=attn,
        )
    else:
        vision = text.unsqueeze(0).expand(3, -1, -1)
    return torch.cat([text.unsqueeze(0), vision], dim=0)


def _video_selector(lm: LoadedModel, inputs: dict):
    """[B, T] bool: prompt positions holding video tokens (all False for text-only inputs)."""
    ids = inputs["input_ids"]
    if lm.is_vl and "video_grid_thw" in inputs:
        return ids == lm.vision.video_token_id
    return ids.new_zeros(ids.shape, dtype=bool)


def _controlled_positions(sel: dict, lm: LoadedModel, positions: str):
    """(owner [N], pos [N]): cache positions that carry dV: video tokens, or every prompt token."""
    import torch

    use = positions
    if use == "auto":
        use = "video" if bool(sel["video"].any()) else "prompt"
    if use == "video":
        if not bool(sel["video"].any()):
            raise ValueError("controller.positions=video but the inputs have no video tokens; use prompt")
        mask = sel["video"]
    else:
        mask = sel["attention_mask"].bool()
    return torch.nonzero(mask, as_tuple=True)


def _prune_lite(cache, attn, video_sel, values_last, ratio: float):
    """V-Reason-Lite: drop the `ratio` of video tokens with the lowest last-layer value norm, in every layer.

    Rows keep different numbers of tokens, so they are re-packed to the right (left padding) and the
    attention mask follows. Keys already carry their rotary positions, so moving them is safe.
    Returns (new attention mask [B, S'], kept-video selector [B, S'], kept count per row [B]).
    """
    import torch

    B, S = attn.shape
    # [B, kv_heads, S, head_dim] -> [B, S]: L2 over head_dim, mean over kv heads
    norms = values_last.float().norm(dim=-1).mean(dim=1)
    keep = attn.bool().clone()
    for b in range(B):
        vid = torch.nonzero(video_sel[b], as_tuple=True)[0]
        n_drop = int(vid.numel() * ratio)
        if n_drop:
            drop = vid[torch.argsort(norms[b, vid], stable=True)[:n_drop]]
            keep[b, drop] = False
    counts = keep.sum(dim=1)
    S2 = int(counts.max())
    gather = torch.zeros((B, S2), dtype=torch.long, device=attn.device)
    new_attn = torch.zeros((B, S2), dtype=attn.dtype, device=attn.device)
    new_vid = torch.zeros((B, S2), dtype=torch.bool, device=attn.device)
    for b in range(B):
        idx = torch.nonzero(keep[b], as_tuple=True)[0]
        gather[b, S2 - idx.numel():] = idx
        new_attn[b, S2 - idx.numel():] = 1
        new_vid[b, S2 - idx.numel():] = video_sel[b, idx]
    for layer in cache.layers:
        g = gather.view(B, 1, S2, 1).expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
        layer.keys = layer.keys.gather(2, g)
        layer.values = layer.values.gather(2, g)
    return new_attn, new_vid, new_vid.sum(dim=1)


def _select_rows(cache, idx) -> None:
    for layer in cache.layers:
        layer.keys = layer.keys[idx]
        layer.values = layer.values[idx]


def _count_think_tokens(tokenizer, text: str, n_out: int) -> int:
    """Output tokens up to and including `</think>`; all of them if thinking never closed."""
    end = text.find("</think>")
    if end >= 0:
        return len(tokenizer(text[: end + len("</think>")], add_special_tokens=False)["input_ids"])
    return n_out if "<think>" in text else 0


def decode_batch(lm: LoadedModel, batch: list[ModelInputs], settings: DecodeSettings) -> list[DecodeResult]:
    """Decode `batch` together; each sample keeps its own controller state. One result per input."""
    import torch
    from transformers import DynamicCache

    cc = settings.controller
    use_controller = settings.mode in ("vreason", "vreason_lite")
    model, tok = lm.model, lm.tokenizer
    B = len(batch)
    t0 = time.perf_counter()

    inputs = _collate(lm, batch)
    position_ids = _position_ids(lm, inputs)
    attn = inputs["attention_mask"]
    cache = DynamicCache(config=model.config)
    capture = _LastLayerInput()
    hook = lm.last_layer().register_forward_pre_hook(capture, with_kwargs=True) if use_controller else None

    n_video = [b.num_video_tokens for b in batch]
    n_kept = list(n_video)
    out_tokens: list[list[int]] = [[] for _ in range(B)]
    traces_h: list[list[float]] = [[] for _ in range(B)]
    traces_hp: list[list[float]] = [[] for _ in range(B)]
    traces_m: list[list[float]] = [[] for _ in range(B)]
    traces_a: list[list[int]] = [[] for _ in range(B)]
    finish = ["max_new_tokens"] * B
    latency = [0.0] * B
    eos = set(lm.eos_token_ids)
    stop_window = max((len(s) for s in settings.stop_strings), default=0)

    policy = PolicyState.new(B, device=lm.device)
    alive = torch.arange(B, device=lm.device)  # original index of each row still decoding
    ctrl: ControllerState | None = None
    final_policy = [None] * B
    final_updates = [0] * B

    try:
        with torch.no_grad():
            # the base model stops at the final hidden state; lm_head is applied only where needed
            hidden = _hidden(lm, inputs, position_ids, cache)
            if settings.mode == "vreason_lite":
                video_sel = _video_selector(lm, inputs)
                attn, video_sel, kept = _prune_lite(cache, attn, video_sel, cache.layers[-1].values, settings.prune_ratio)
                n_kept = [int(k) for k in kept]
                owner, pos = _controlled_positions({"attention_mask": attn, "video": video_sel}, lm, cc.positions)
                # the hook saw the unpruned prompt; its last position is kept, its mask must follow the pruning
                capture.kwargs["attention_mask"] = _mask_for(lm, attn)
            elif use_controller:
                owner, pos = _controlled_positions({"attention_mask": attn, "video": _video_selector(lm, inputs)}, lm, cc.positions)
            if use_controller:
                ctrl = ControllerState.new(cache.layers[-1].values, owner, pos, B)
            next_pos = position_ids[..., -1:] + 1  # [4, B, 1] or [B, 1]

            for step in range(settings.max_new_tokens):
                updated = use_controller and step % cc.update_every == 0
                if updated:
                    # H_t, alpha_t and the first Adam step share one grad-enabled last-layer forward
                    h, alpha, logits, h_post = _controller_update(lm, cache, capture, ctrl, policy, cc)
                else:
                    logits = lm.lm_head()(hidden)[:, -1, :].float()  # [b, V]
                    h = h_post = entropy_from_logits(logits)
                    alpha = _policy_step(policy, h, cc)
                next_tok = logits.argmax(dim=-1)  # [b]

                now = time.perf_counter() - t0
                done_rows = []
                rows = zip(alive.tolist(), next_tok.tolist(), h.tolist(), h_post.tolist(), policy.ema.tolist(), alpha.tolist())
                for r, (i, t, h_r, hp_r, m_r, a_r) in enumerate(rows):
                    traces_h[i].append(h_r)
                    traces_hp[i].append(hp_r)
                    traces_m[i].append(m_r)
                    traces_a[i].append(int(a_r) if updated else 0)
                    if t in eos:
                        finish[i] = "eos"
                    else:
                        out_tokens[i].append(t)
                        if stop_window and _hit_stop(tok, out_tokens[i], settings.stop_strings, stop_window):
                            finish[i] = "stop_string"
                    if finish[i] != "max_new_tokens" or step == settings.max_new_tokens - 1:
                        latency[i] = now
                        done_rows.append(r)
                for r in done_rows:
                    _finalise(r, int(alive[r]), policy, ctrl, final_policy, final_updates)
                if len(done_rows) == alive.numel():
                    break
                if done_rows:
                    keep = torch.tensor([r for r in range(alive.numel()) if r not in done_rows], device=lm.device)
                    n_before = alive.numel()
                    alive, next_tok, attn = alive[keep], next_tok[keep], attn[keep]
                    next_pos = next_pos[..., keep, :]
                    policy = policy.select(keep)
                    _select_rows(cache, keep)
                    if ctrl is not None:
                        ctrl = ctrl.select(keep, n_before)

                attn = torch.cat([attn, attn.new_ones((attn.shape[0], 1))], dim=-1)
                hidden = _hidden(
                    lm, {"input_ids": next_tok[:, None], "attention_mask": attn}, next_pos, cache
                )
                next_pos = next_pos + 1
    finally:
        if hook is not None:
            hook.remove()

    results = []
    for i in range(B):
        text = tok.decode(out_tokens[i], skip_special_tokens=True)
        n_out = len(traces_h[i])
        peak, updates = final_policy[i], final_updates[i]
        results.append(
            DecodeResult(
                token_ids=out_tokens[i],
                text=text,
                finish_reason=finish[i],
                entropy=traces_h[i],
                entropy_post=traces_hp[i],
                entropy_ema=traces_m[i],
                alpha=traces_a[i],
                controller_updates=updates,
                ema_peak_step=peak,
                num_prompt_tokens=len(batch[i].input_ids),
                num_video_tokens=n_video[i],
                num_video_tokens_kept=n_kept[i],
                num_output_tokens=n_out,
                num_think_tokens=_count_think_tokens(tok, text, n_out),
                latency_s=latency[i],
            )
        )
    return results


def _finalise(row: int, i: int, policy: PolicyState, ctrl, final_policy: list, final_updates: list) -> None:
    p = int(policy.peak_step[row])
    final_policy[i] = p if p >= 0 else None
    final_updates[i] = int(ctrl.updates[row]) if ctrl is not None else 0


def _hit_stop(tok, ids: list[int], stops: list[str], window: int) -> bool:
    # a token is at least one character, so a just-completed stop string lies in the last `window` tokens
    tail = tok.decode(ids[-window:], skip_special_tokens=False)
    return any(s in tail for s in stops)


def _mask_for(lm: LoadedModel, attn):
    """A one-query-row mask over the cache from a 2D padding mask, in the form the attention kernel takes."""
    import torch

    impl = lm.model.config._attn_implementation
    if impl and "flash" in impl:
        return attn
    if impl == "sdpa":
        return attn.bool()[:, None, None, :]
    neg = torch.finfo(lm.dtype).min
    return torch.where(attn.bool()[:, None, None, :], 0.0, neg).to(lm.dtype)


def _last_layer_logits(lm: LoadedModel, capture: _LastLayerInput, keys, values):
    """Re-run the last decoder layer for the current position, then norm + lm_head -> [b, V] fp32."""
    out = lm.last_layer()(
        capture.hidden,
        past_key_values=_FixedKV(keys, values),
        use_cache=False,
        **capture.kwargs,
    )
    hidden = out[0] if isinstance(out, tuple) else out  # [b, 1, D]
    return lm.lm_head()(lm.final_norm()(hidden))[:, -1, :].float()


def _hidden(lm: LoadedModel, inputs: dict, position_ids, cache):
    """Run the base model (no lm_head) and return the final hidden state at the last position [b, 1, D]."""
    out = lm.model.model(**inputs, position_ids=position_ids, past_key_values=cache, use_cache=True)
    return out.last_hidden_state[:, -1:, :]


def _policy_step(policy: PolicyState, h, cc: ControllerConfig):
    return policy_step(policy, h, cc.rule, cc.ema_beta, cc.delta, cc.min_explore_tokens, cc.peak_from_step)


def _controller_update(lm: LoadedModel, cache, capture: _LastLayerInput, ctrl: ControllerState, policy: PolicyState, cc: ControllerConfig):
    """`steps_per_update` Adam steps on alpha_t * H_t for every sample, then the post-update logits.

    Returns (H_t before the update [b], alpha_t [b], post-update logits [b, V], their entropy [b]).
    """
    import torch

    layer = cache.layers[-1]
    keys, values = layer.keys, layer.values  # [b, kv_heads, S, head_dim]
    active = torch.ones(keys.shape[0], dtype=torch.bool, device=keys.device)
    h_pre = alpha = None
    for _ in range(cc.steps_per_update):
        dv = ctrl.dv.detach().requires_grad_(True)
        with torch.enable_grad():
            h = entropy_from_logits(_last_layer_logits(lm, capture, keys, ctrl.effective_values(values, dv)))
            if h_pre is None:
                h_pre = h.detach()
                alpha = _policy_step(policy, h_pre, cc)
            # samples are independent: the sum gives each dV only its own sample's gradient
            (grad,) = torch.autograd.grad((alpha * h).sum(), dv)
        adam_step(ctrl, grad, active, cc.lr, cc.adam_beta1, cc.adam_beta2, cc.adam_eps)
    ctrl.updates = ctrl.updates + 1
    ctrl.write_cache(values)
    logits = _last_layer_logits(lm, capture, keys, values)
    return h_pre, alpha, logits, entropy_from_logits(logits)
