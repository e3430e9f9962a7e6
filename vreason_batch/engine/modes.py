"""Decoding modes, in one registry: name -> what the decode loop does for a row of that mode.

Config validation, the decode loop, the report and the bench all take their list of modes from
here, so a new mode is one `register` call. No heavy imports: config.py reads this at import.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModeSpec:
    name: str
    controlled: bool  # carries a per-sample dV tuned while decoding (V-Reason)
    prune_video: bool  # V-Reason-Lite: drop low-norm video tokens from every layer's cache after prefill
    description: str


MODES: dict[str, ModeSpec] = {}


def register(spec: ModeSpec) -> ModeSpec:
    if spec.name in MODES:
        raise ValueError(f"decoding mode {spec.name!r} is registered twice")
    MODES[spec.name] = spec
    return spec


def get_mode(name: str) -> ModeSpec:
    try:
        return MODES[name]
    except KeyError:
        raise ValueError(f"unknown decoding mode {name!r}; known: {tuple(MODES)}") from None


register(ModeSpec("greedy", controlled=False, prune_video=False, description="the base model, greedy"))
register(ModeSpec("vreason", controlled=True, prune_video=False, description="V-Reason: dV on the last layer's values"))
register(ModeSpec("vreason_lite", controlled=True, prune_video=True,
                  description="V-Reason-Lite: V-Reason over a cache pruned of low-norm video tokens"))

# Registration order is the order reports and benches list modes in.
MODE_NAMES: tuple[str, ...] = tuple(MODES)
