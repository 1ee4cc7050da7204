"""SteerLM's attribute-conditioned prompt (Dong et al. 2023, "SteerLM: Attribute Conditioned SFT
as an (User-Steerable) Alternative to RLHF"; Li et al. 2024 section 3.2, "Self-sampled SteerLM").

The desired HelpSteer attributes are written into the prompt, as SteerLM writes its attribute
string (``helpfulness:4,correctness:4,coherence:4,complexity:2,verbosity:2``); training
(``bpo_ray.generate.annotations.steerlm_rows``) and serving (the chat request's
``steer_attributes`` field) both build it here, so the model is asked at inference exactly the way
it was trained. In the LLaVA-1.5 prompt the string is the last line of the final user turn.
"""

from __future__ import annotations

from typing import Mapping

from bpo_ray.schemas import HELPSTEER_ATTRIBUTES

ASSISTANT = " ASSISTANT:"


def steer_attributes_text(attributes: Mapping[str, float]) -> str:
    """HelpSteer's attribute string as SteerLM writes it: ``helpfulness:4,correctness:4,...`` in
    HelpSteer's attribute order; every one of the five must be given, each an integer 0-4."""
    missing = [a for a in HELPSTEER_ATTRIBUTES if a not in attributes]
    extra = sorted(set(attributes) - set(HELPSTEER_ATTRIBUTES))
    if missing or extra:
        raise ValueError(f"steer attributes: missing {missing}, unknown {extra} (need {list(HELPSTEER_ATTRIBUTES)})")
    parts = []
    for a in HELPSTEER_ATTRIBUTES:
        v = attributes[a]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or not 0 <= v <= 4:
            raise ValueError(f"steer attribute {a}={v!r} is not an integer in 0-4")
        parts.append(f"{a}:{int(v)}")
    return ",".join(parts)


def steer_prompt(prompt: str, attributes: Mapping[str, float]) -> str:
    """``prompt`` (LLaVA-1.5 format, ending in `` ASSISTANT:``) with the desired attributes written
    as the last line of the final user turn: ``...question\\nAttributes: helpfulness:4,...
    ASSISTANT:``."""
    if not prompt.endswith(ASSISTANT):
        raise ValueError(f"prompt does not end with {ASSISTANT.strip()!r}: {prompt[-60:]!r}")
    return f"{prompt[:-len(ASSISTANT)]}\nAttributes: {steer_attributes_text(attributes)}{ASSISTANT}"


