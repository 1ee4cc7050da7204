"""LLaVA-1.5 conversation format, shared by every stage so prompts match byte for byte.

LLaVA-1.5 (``llava-hf/llava-1.5-7b-hf``) uses ``USER: <image>\\n{question} ASSISTANT: {answer}</s>``;
later turns append ``USER: {question} ASSISTANT:``.
"""

from __future__ import annotations

from typing import Sequence

IMAGE_TOKEN = "<image>"


def build_prompt(question: str, history: Sequence[tuple[str, str]] = ()) -> str:
    """The text fed to the model before the answer. ``history`` holds earlier (question, answer)
    turns; the image placeholder goes in the first user turn only, as in LLaVA's training data."""
    turns = list(history) + [(question, None)]
    parts = []
    for i, (q, a) in enumerate(turns):
        q = strip_image_token(q)
        user = f"USER: {IMAGE_TOKEN}\n{q}" if i == 0 else f"USER: {q}"
        parts.append(f"{user} ASSISTANT:" + (f" {a}</s>" if a is not None else ""))
    return "".join(parts)


def strip_image_token(text: str) -> str:
    """Remove ``<image>`` placeholders and the newline that usually follows them."""
    return text.replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "").strip()


def text_prompt(instruction: str) -> str:
    """Prompt for the text-only LLM (error injection): same chat roles, no image."""
    return f"USER: {instruction.strip()} ASSISTANT:"
