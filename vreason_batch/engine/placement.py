"""Where a model's weights go: all on one device, or a device map over the actor's GPUs (accelerate).

A model that fits one device loads straight onto it (`device_map={"": device}`: no copy staged
in host memory). A sharded model (`Placement.num_devices` > 1, or a memory budget that leaves
some layers without room) gets accelerate's device map: decoder layers spread over the GPUs
(balanced), what finds no room offloaded to CPU memory or disk, as accelerate does when memory is
short. Whatever the map, the last decoder layer, the final norm and lm_head (and the input
embeddings when lm_head shares their weight) sit together on one accelerator, the head device,
never offloaded: the engine computes that layer itself from its weights (last_layer.py) and
keeps the controller's state there. `LoadedModel.device` is that device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

OFFLOADED = ("cpu", "disk")  # device-map values that mean "stored off the accelerator"


@dataclass(frozen=True)
class Placement:
    """How an actor's model is spread: over `num_devices` accelerators, within `max_memory` per device."""

    num_devices: int = 1
    max_memory: dict[str, str] = field(default_factory=dict)  # accelerate's budget: {"0": "70GiB", "cpu": "100GiB"}
    offload_folder: str | None = None  # where layers offloaded to disk are kept

    @property
    def sharded(self) -> bool:
        return self.num_devices > 1 or bool(self.max_memory)


def head_modules(model) -> list[str]:
    """Names of the modules that must share the head device: last decoder layer, final norm, lm_head."""
    base = model.model
    text = getattr(base, "language_model", base)
    prefix = "model.language_model" if text is not base else "model"
    names = [f"{prefix}.layers.{len(text.layers) - 1}", f"{prefix}.norm", "lm_head"]
    tied = getattr(model.config, "tie_word_embeddings", False)  # (a shell built without weights is not tied yet)
    if tied or model.get_output_embeddings().weight is model.get_input_embeddings().weight:  # one tensor, one place
        names.append(f"{prefix}.embed_tokens")
    return names


def _device_key(key: str):
    return int(key) if key.isdigit() else key


def _budget(placement: Placement, device) -> dict | None:
    """accelerate's max_memory for this actor, or None (all free memory of each visible GPU)."""
    import torch

    if device.type == "cuda":
        have = torch.cuda.device_count()
        if have < placement.num_devices:
            raise RuntimeError(f"runtime.num_gpus_per_actor={placement.num_devices} but this actor sees {have} GPU(s)")
    if not placement.max_memory:
        return None
    return {_device_key(k): v for k, v in placement.max_memory.items()}


def _split(dmap: dict, model, key: str) -> None:
    """Replace entry `key` by one entry per direct child (and own parameter) of that module, same device."""
    where = dmap.pop(key)
    module = model.get_submodule(key) if key else model
    dot = f"{key}." if key else ""
    for name, _ in [*module.named_children(), *module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
        dmap[f"{dot}{name}"] = where


def pin(dmap: dict, model, names: list[str], device) -> dict:
    """`dmap` with each module in `names` placed on `device` (coarser entries split as needed)."""
    dmap = dict(dmap)
    for name in names:
        while name not in dmap:
            owner = next((k for k in dmap if k == "" or name.startswith(k + ".")), None)
            if owner is None:
                raise ValueError(f"device map has no entry covering {name}")
            _split(dmap, model, owner)
        dmap[name] = device
    return dmap


def head_device(dmap: dict, last_layer: str, device) -> Any:
    """The head's device: where the map put the last layer unless offloaded, else the last accelerator used."""
    where = next(v for k, v in dmap.items() if k == "" or last_layer == k or last_layer.startswith(k + "."))
    if device.type != "cuda":
        return "cpu"
    if where not in OFFLOADED:
        return where
    used = [v for v in dmap.values() if v not in OFFLOADED]
    return max(used) if used else 0


def device_map(build, dtype, device, placement: Placement) -> dict:
    """The device map `from_pretrained` loads with (module name -> device index, "cpu" or "disk").

    build(): the model's modules with no weights allocated (called under accelerate's
    init_empty_weights), for the map's sizes; only called for a sharded placement.
    """
    if not placement.sharded:
        return {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    from accelerate import infer_auto_device_map, init_empty_weights
    from accelerate.utils import get_balanced_memory

    with init_empty_weights():
        shell = build()
    budget, no_split = _budget(placement, device), list(shell._no_split_modules or [])
    if device.type == "cuda" and placement.num_devices > 1:
        budget = get_balanced_memory(shell, max_memory=budget, no_split_module_classes=no_split, dtype=dtype)
    dmap = infer_auto_device_map(shell, max_memory=budget, no_split_module_classes=no_split, dtype=dtype)
    names = head_modules(shell)
    return pin(dmap, shell, names, head_device(dmap, names[0], device))


def loaded_head_device(model, device):
    """The torch.device of a loaded model's head (its last layer), whatever map it was loaded with."""
    import torch

    name = head_modules(model)[0]
    weight = next(p for p in model.get_submodule(name).parameters())
    return weight.device if weight.device.type != "meta" else torch.device(device)
