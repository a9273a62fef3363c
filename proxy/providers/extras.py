"""Which vendor owns which of the seed page's provider-specific fields.

A request may carry fields meant for one vendor (fal's `acceleration`, Replicate's `go_fast`, Alibaba's
`watermark`). They reach only routes of that vendor; every other unknown field still passes through
to OpenAI-compatible upstreams, which may know it.
"""

from __future__ import annotations

from typing import Any

VENDOR_FIELDS: dict[str, frozenset[str]] = {
    # The local engine's speed tier (the local kinds read it; no upstream knows it).
    "diffusers": frozenset({"tier"}),
    "dashscope": frozenset({"watermark"}),
    "fal": frozenset({"acceleration", "enable_safety_checker", "sync_mode", "use_turbo"}),
    "replicate": frozenset({
        "disable_safety_checker", "extra_lora_scale", "extra_lora_weights", "go_fast", "image_size",
        "lora_scale", "lora_weights", "output_quality", "replicate_weights",
        # Replicate's own names for fields the proxy has under other names.
        "guidance", "enhance_prompt", "strength",
    }),
}


_ALL_FIELDS = frozenset().union(*VENDOR_FIELDS.values())
# The fields a provider of each kind never gets (for a kind not listed: every vendor's), worked out once.
_FOREIGN = {kind: frozenset().union(*(f for vendor, f in VENDOR_FIELDS.items() if vendor != kind))
            for kind in VENDOR_FIELDS}


def extras_for(kind: str, extra: dict[str, Any]) -> dict[str, Any]:
    """The request's unknown fields that may go to a provider of `kind` (other vendors' fields dropped)."""
    if not extra:
        return {}
    foreign = _FOREIGN.get(kind, _ALL_FIELDS)
    return {k: v for k, v in extra.items() if k not in foreign}
