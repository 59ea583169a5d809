"""Reading the option letter out of a completion: the rule evaluation and the 4DThinker reward share.

Pure Python on the decoded completion with special tokens kept. A completion is read in up to
three tries: the first `<answer>...</answer>` span (case-insensitive tags), else the whole text;
then the whole text; then (evaluation only) the text without latent tokens, as the upstream
evaluator does. Each try deletes the stock phrases and takes the first allowed letter left.
"""

from __future__ import annotations

import re

from fourd_jax.data.latent_tokens import LATENT_TOKENS

# Stock phrases deleted before looking for the letter, in deletion order. A phrase must come
# before any phrase it contains ("The answer is" before "The answer"), else the shorter one would
# leave a fragment behind; "Best answer:" must go because its "B" would be read as the choice.
STOCK_PHRASES = (
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option is",
    "The correct option is",
    "Best answer:",
    "Best option:",
    "Answer:",
    "Option:",
)

# Prose longer than this many words with no option letter yields no letter (upstream's rule).
MAX_WORDS_WITHOUT_LETTER = 10

_ANSWER_CONTENT = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL | re.IGNORECASE)


def letter_in(text: str, letters: str) -> str | None:
    """The first of `letters` in `text` after stock-phrase removal, under the word-count rule."""
    for phrase in STOCK_PHRASES:
        text = text.replace(phrase, "")
    has_letter = any(ch in letters for ch in text)
    # Upstream's rule, kept verbatim: long prose without a letter gives none (the search below
    # would find none either, so it only documents intent).
    if len(text.split()) > MAX_WORDS_WITHOUT_LETTER and not has_letter:
        return None
    return next((ch for ch in text if ch in letters), None)


def read_letter(completion: str, letters: str, strip_latents: bool) -> str | None:
    """The option letter of a completion: answer span, then whole text, then (optionally) de-latented text."""
    whole = completion.strip()
    match = _ANSWER_CONTENT.search(completion)
    tries = [match.group(1) if match else whole, whole]
    if strip_latents:
        bare = completion
        for token in LATENT_TOKENS:
            bare = bare.replace(token, "")
        tries.append(bare.strip())
    for text in tries:
        letter = letter_in(text, letters)
        if letter is not None:
            return letter
    return None


def extract_choice(completion: str, letters: str = "ABCD") -> str | None:
    """The option letter (one of `letters`) a completion answers with, or None (all three tries)."""
    return read_letter(completion, letters, strip_latents=True)


def solution_key(solution: str) -> str:
    """The option letter of a solution string: its first character, upper-cased ("" if empty)."""
    return solution.strip().upper()[:1]
