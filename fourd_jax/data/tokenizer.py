"""An offline byte-level BPE tokenizer with Qwen2.5-VL's special tokens and the latent tokens.

Nothing is downloaded: the demo trains a small BPE on its own text with HF `tokenizers`, adds
the special tokens Qwen2.5-VL uses (same strings, same order, after the ordinary vocabulary, as
in Qwen) and the three latent tokens, and saves it in HF format. A real Qwen tokenizer directory
works everywhere this one does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from fourd_jax.data import records
from fourd_jax.data.features import INSTRUCTION
from fourd_jax.data.latent_tokens import LATENT_TOKENS, add_latent_tokens
from fourd_jax.errors import InputError
from fourd_jax.model.config import ModelConfig

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)

# The Qwen2-VL chat layout: a default system turn, <|im_start|>role\n ... <|im_end|>\n, and one
# vision_start/pad/end triple per image or video item.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> Any:
    """Train a byte-level BPE on `texts`; add Qwen's special tokens and the latent tokens.

    `vocab_size` counts ordinary tokens (bytes + merges); special tokens come after them.
    """
    from transformers import PreTrainedTokenizerFast  # slow to import; only building a tokenizer needs it

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False, special_tokens=[],
    )
    core.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core)
    tok.add_tokens(list(QWEN_SPECIAL_TOKENS), special_tokens=True)
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    tok.chat_template = CHAT_TEMPLATE
    add_latent_tokens(tok)
    return tok


def record_texts(path: Any) -> Iterator[str]:
    """The text a tokenizer should cover for records under `path`: questions, options, traces and
    the fixed instruction and answer wording of the conversation."""
    yield INSTRUCTION
    for sample in records.read(path, decode_images=False):
        yield sample["question"]
        yield from sample["options"]
        if sample["trace"]:
            yield sample["trace"]


def config_for_tokenizer(tokenizer: Any, config: ModelConfig, pad_vocab_to: int = 128) -> ModelConfig:
    """`config` with its vocabulary and special/latent token ids taken from `tokenizer`.

    The vocabulary is rounded up to a multiple of `pad_vocab_to` (unused rows), so the embedding
    and LM head split evenly over tensor-parallel devices.
    """
    vocab = tokenizer.get_vocab()
    needed = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|im_end|>",
              "<|endoftext|>") + LATENT_TOKENS
    absent = [t for t in needed if t not in vocab]
    if absent:
        raise InputError(f"The tokenizer lacks the token(s) {absent} that Qwen2.5-VL needs.")
    size = -(-(max(vocab.values()) + 1) // pad_vocab_to) * pad_vocab_to
    return config.replace(
        text=dataclasses.replace(config.text, vocab_size=max(size, config.text.vocab_size)),
        vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"],
        image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
        bos_token_id=vocab["<|endoftext|>"], eos_token_id=vocab["<|im_end|>"],
        pad_token_id=vocab["<|endoftext|>"],
        latent_start_token_id=vocab[LATENT_TOKENS[0]], latent_pad_token_id=vocab[LATENT_TOKENS[1]],
        latent_end_token_id=vocab[LATENT_TOKENS[2]],
    )
