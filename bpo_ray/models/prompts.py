"""LLaVA-1.5 conversation format, shared by every stage so prompts match byte for byte.

LLaVA-1.5 (``llava-hf/llava-1.5-7b-hf``) uses ``USER: <image>\\n{question} ASSISTANT: {answer}</s>``;
later turns append ``USER: {question} ASSISTANT:``.
"""

from __future__ import annotations

from typing import Sequence

IMAGE_TOKEN = "<image>"


def build_prompt(question: str, history: Sequence[tuple[str, str]] = (), with_image: bool = True) -> str:
    """The text fed to the model before the answer. ``history`` holds earlier (question, answer)
    turns; the image placeholder goes in the first user turn only, as in LLaVA's training data,
    and is left out for a conversation without an image (``with_image=False``)."""
    turns = list(history) + [(question, None)]
    parts = []
    for i, (q, a) in enumerate(turns):
        q = strip_image_token(q)
        user = f"USER: {IMAGE_TOKEN}\n{q}" if i == 0 and with_image else f"USER: {q}"
        parts.append(f"{user} ASSISTANT:" + (f" {a}</s>" if a is not None else ""))
    return "".join(parts)


def pair_prompt(prompt: str) -> str:
    """The LLaVA-1.5 prompt text for a preference pair's ``prompt`` column.

    A full conversation prompt (it already ends in ``ASSISTANT:``) is used as is, with an
    ``<image>`` placeholder added to the first turn if missing; so is one that ends in a partial
    answer after its last ``ASSISTANT:`` (on-policy sentence-level pairs put the shared grounded
    prefix there: SENTINEL's context-aware pairs, the prefix conditions both answers and is never
    scored); a bare question is wrapped by ``build_prompt`` (``USER: <image>\\n{question} ASSISTANT:``).
    """
    text = prompt.strip()
    if text.endswith("ASSISTANT:") or (text.startswith("USER:") and " ASSISTANT:" in text):
        if IMAGE_TOKEN not in text:
            text = text.replace("USER: ", f"USER: {IMAGE_TOKEN}\n", 1)
        return text
    return build_prompt(text)


def continuation_prompt(prompt: str, prefix: str) -> str:
    """``prompt`` (ending in ``ASSISTANT:``) continued by a partial answer ``prefix``."""
    return f"{prompt} {prefix}" if prefix else prompt


def strip_image_token(text: str) -> str:
    """Remove ``<image>`` placeholders and the newline that usually follows them."""
    return text.replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "").strip()


def text_prompt(instruction: str) -> str:
    """Prompt for the text-only LLM (error injection): same chat roles, no image."""
    return f"USER: {instruction.strip()} ASSISTANT:"
