"""A byte-level BPE tokenizer trained locally (no hub), in Llama's special-token layout."""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from bpo_ray.models.prompts import IMAGE_TOKEN

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]

# Always in the training text so chat roles and common words are single tokens whatever the corpus.
BASE_TEXT = [
    "USER: ASSISTANT: Question: Response: Modified response: Describe the image in detail.",
    "What is the color of the object? How many objects are there? Is there a cup in the image?",
    "Yes. No. There is a red cup on the left. There are two blue dogs on the right.",
    "I will give you a question and a response about an image. Pretend that you can see the image.",
    "You must modify the response by changing the original details, such as adding more objects or "
    "change the attributes of objects. Note that the modified responses should still be common in reality.",
]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` (deterministic for the same input).

    Byte-level BPE never produces ``<unk>``, so any UTF-8 text (and replacement characters from
    non-UTF-8 input) round-trips. A BOS token is prepended like Llama's tokenizer does.
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(BASE_TEXT) + list(texts), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]),
    ])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
        model_max_length=4096,
    )
