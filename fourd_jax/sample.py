"""Jitted KV-cache sampling: one prefill, then one token per step inside `lax.while_loop`.

The cache is preallocated to prompt + max_new_tokens slots, so every step has the same shapes
and the whole generation is a single compiled program with no host round-trip per token.

Imagery decoding (SPEC §3.4): when a row emits `<|latent_start|>`, the next `latent_size` steps
write `<|latent_pad|>` and feed the previous step's final hidden state as the input embedding
(a continuous thought), then `<|latent_end|>` is forced. The fed hidden states come back with
the tokens (`Rollout.latent_inputs`) so a later forward can score exactly the sampled sequence.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from fourd_jax.errors import InputError
from fourd_jax.model import rope
from fourd_jax.model.inputs import PreparedInputs, prepare_inputs
from fourd_jax.model.text import KVCache, init_kv_cache, unstack_layers
from fourd_jax.model.vlm import Qwen25VL


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to continue a prompt. Hashable: it is a static argument of the jitted sampler."""

    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    eos_token_ids: tuple[int, ...] = ()
    stop_sequences: tuple[tuple[int, ...], ...] = ()  # token-id sequences that end a row (incl.)
    pad_token_id: int = 0
    imagery: bool = True  # latent blocks after <|latent_start|> (when the model has latent tokens)
    latent_size: int = 4
    max_latent_blocks: int = 8  # <|latent_start|> is masked once a row has used this many
    # Never sample the image/video placeholders: a forward over the sampled sequence would put
    # visual features there, so it would not score the sequence that was sampled.
    block_media_tokens: bool = True


@flax.struct.dataclass
class Rollout:
    """Sampled continuations of a batch of prompts (rows are prompt-major: prompt i, sample j at
    row i * num_samples + j)."""

    tokens: jax.Array  # [B, N] int32; pad_token_id after a row ends
    logprobs: jax.Array  # [B, N] float32 log-prob of each sampled token (0 where forced or padding)
    completion_mask: jax.Array  # [B, N] bool: tokens up to and including the one that ended the row
    forced_mask: jax.Array  # [B, N] bool: tokens written by the imagery rule, not sampled
    latent_inputs: jax.Array  # [B, K, hidden]: hidden states fed at the row's <|latent_pad|> slots, in order


def prepare_prompt(model: Qwen25VL, *processor_outputs: Any, **processor_kwargs: Any) -> PreparedInputs:
    """Host-side preparation of processor outputs for generation (see `prepare_inputs`).

    Prompts must be left-padded: generation appends at the right edge of every row.
    """
    prompt = prepare_inputs(model.config, *processor_outputs, **processor_kwargs)
    check_left_padded(prompt.attention_mask)
    return prompt


def tokenizer_stops(tokenizer: Any, stop_strings: Any = ()) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """(EOS ids, stop sequences) for a tokenizer: its EOS and `<|im_end|>` (the chat turn's end),
    and each stop string as the token ids it encodes to."""
    eos = tuple(sorted({i for i in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"))
                        if isinstance(i, int) and i >= 0}))
    return eos, tuple(tuple(tokenizer.encode(text, add_special_tokens=False)) for text in stop_strings)


def sampling_for(tokenizer: Any, model_config: Any, stop_strings: Any = (), **fields: Any) -> SamplingConfig:
    """A SamplingConfig whose EOS ids and stop sequences come from the tokenizer (`tokenizer_stops`)
    and whose padding is the model's; `fields`: the other SamplingConfig fields."""
    eos, stops = tokenizer_stops(tokenizer, stop_strings)
    return SamplingConfig(eos_token_ids=eos, stop_sequences=stops, pad_token_id=int(model_config.pad_token_id or 0),
                          **fields)


def check_left_padded(attention_mask: Any) -> None:
    if np.any(np.asarray(attention_mask)[:, -1] == 0):
        raise InputError("Prompts must be left-padded: attention_mask is 0 in the last column.")


def token_logprobs(logits: jax.Array, tokens: jax.Array, temperature: float) -> jax.Array:
    """log p(token) under the sampling temperature (1 for greedy), in fp32: the policy whose
    probabilities the sampler reports and GRPO scores."""
    scaled = logits.astype(jnp.float32) / (temperature if temperature > 0 else 1.0)
    return jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), tokens[..., None], axis=-1)[..., 0]


def filter_logits(logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Temperature-scaled fp32 logits with everything outside top-k / the top-p nucleus at -inf."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        logits = jnp.where(logits < nucleus_threshold(logits, top_p), -jnp.inf, logits)
    return logits


NUCLEUS_CANDIDATES = 64  # a trained model's nucleus almost always lies within its top 64 tokens


def nucleus_threshold(logits: jax.Array, top_p: float) -> jax.Array:
    """The smallest logit [..., 1] of the top-p nucleus: the shortest prefix of the descending
    order whose probability mass reaches top_p (the first token always stays).

    No sort of the vocabulary (XLA's sort was most of a sampling step on CPU): the nucleus is looked
    for among the top NUCLEUS_CANDIDATES tokens first, and when their mass falls short of top_p in
    some row (a flat distribution), the threshold is found by bisection instead (exact either way).
    """
    log_norm = jax.nn.logsumexp(logits, axis=-1, keepdims=True)

    def from_candidates(ordered):
        probs = jnp.exp(ordered - log_norm)
        kept = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        return jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)

    k = min(NUCLEUS_CANDIDATES, logits.shape[-1])
    top = jax.lax.top_k(logits, k)[0]
    enough = jnp.all(jnp.sum(jnp.exp(top - log_norm), axis=-1) >= top_p)
    return jax.lax.cond(enough, lambda: from_candidates(top), lambda: nucleus_by_bisection(logits, log_norm, top_p))


def ordered_keys(x: jax.Array) -> jax.Array:
    """uint32 keys of float32 values in the same order (-inf lowest): the sign-magnitude bits
    flipped into one increasing range, so a bisection over keys is a bisection over values."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    negative = (bits >> 31).astype(bool)
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def nucleus_by_bisection(logits: jax.Array, log_norm: jax.Array, top_p: float) -> jax.Array:
    """`nucleus_threshold` for any distribution in 32 masked sums over the vocabulary.

    A token stays when the mass of the tokens above it is below top_p. That mass only falls as the
    value rises, so the tokens that stay are those whose key is at least the smallest key t with
    mass(above t) < top_p, which a bisection over the 2^32 keys finds in 32 halvings.
    """
    probs = jnp.exp(logits - log_norm)
    keys = ordered_keys(logits)

    def halve(_, bounds):
        low, high = bounds  # mass(above low) >= top_p (or low is below every key); mass(above high) < top_p
        middle = low + (high - low) // 2
        below_p = jnp.sum(jnp.where(keys > middle, probs, 0.0), axis=-1, keepdims=True) < top_p
        return jnp.where(below_p, low, middle), jnp.where(below_p, middle, high)

    top_key = jnp.max(keys, axis=-1, keepdims=True)  # nothing lies above the top token: it always stays
    _, smallest = jax.lax.fori_loop(0, 32, halve, (jnp.zeros_like(top_key), top_key))
    return jnp.min(jnp.where(keys >= smallest, logits, jnp.inf), axis=-1, keepdims=True)


def choose_tokens(logits: jax.Array, key: jax.Array, config: SamplingConfig) -> jax.Array:
    """Next token per row: argmax when greedy, else a draw from the filtered distribution (with one
    key for the batch, or one key per row [B])."""
    if config.temperature == 0:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    filtered = filter_logits(logits, config.temperature, config.top_k, config.top_p)
    if key.ndim:
        return jax.vmap(jax.random.categorical)(key, filtered).astype(jnp.int32)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


def _repeat_rows(tree: Any, times: int) -> Any:
    return jax.tree_util.tree_map(lambda x: jnp.repeat(x, times, axis=0), tree)


def _repeat_cache(cache: KVCache, times: int) -> KVCache:
    return KVCache(jnp.repeat(cache.k, times, axis=1), jnp.repeat(cache.v, times, axis=1))


class Prefilled(NamedTuple):
    """Prompts run once into a KV cache with room for their continuations, repeated per sample."""

    cache: KVCache  # [layers, prompts x samples, kv_heads, prompt_len + n_new, head_dim]
    mask: jax.Array  # [prompts x samples, prompt_len + n_new]: the prompt's tokens, 0 after
    hidden: jax.Array  # [prompts x samples, hidden]: the final hidden state of each prompt's last token

    def repeat(self, times: int) -> Prefilled:
        """Each prompt's row `times` times in a row (its samples), as `prefill(..., num_samples=times)`."""
        return Prefilled(_repeat_cache(self.cache, times), _repeat_rows(self.mask, times),
                         _repeat_rows(self.hidden, times))


def prefill(params: Any, prompt: PreparedInputs, model: Qwen25VL, n_new: int, num_samples: int,
            vision_features: jax.Array | None = None) -> Prefilled:
    """Run the left-padded prompts (and their media) once, then repeat the cache `num_samples` times:
    the sampler decodes from it, and GRPO scores the samples from it (the shared prompt prefix and
    the vision tower run once per prompt, not once per sample). `vision_features`: the prompts'
    merged visual tokens when computed outside (a frozen tower), else the tower runs here."""
    prompts, prompt_len = prompt.input_ids.shape
    cache = init_kv_cache(model.config, prompts, prompt_len + n_new)
    mask = jnp.concatenate([prompt.attention_mask.astype(jnp.int32), jnp.zeros((prompts, n_new), jnp.int32)], axis=1)
    with jax.named_scope("prompt_prefill"):  # named: profiles and tests find where the prompts run
        out = model.apply({"params": params}, prompt.input_ids, attention_mask=mask, position_ids=prompt.position_ids,
                          vision=prompt.vision, vision_features=vision_features, kv_cache=cache, cache_index=0,
                          compute_logits=False)
    return Prefilled(out.kv_cache, mask, out.hidden_states[:, -1]).repeat(num_samples)


@functools.partial(jax.jit, static_argnames=("model", "config", "num_samples", "row_sharding"))
def generate(
    params: Any,
    prompt: PreparedInputs,
    key: jax.Array,
    *,
    model: Qwen25VL,
    config: SamplingConfig,
    num_samples: int = 1,
    row_ids: jax.Array | None = None,
    row_sharding: NamedSharding | None = None,
    vision_features: jax.Array | None = None,
) -> Rollout:
    """Continue every left-padded prompt `num_samples` times (the prompt is prefilled once).

    Returns a Rollout with B = prompts x num_samples rows of `config.max_new_tokens` tokens.
    With `row_ids` [prompts] (e.g. each row's stream position), sample j of prompt i draws from
    the key `key` folded with its id and then j: a row's tokens do not depend on where it sits in
    the batch, so any split of the prompts over processes samples the same. `row_sharding` (of a
    1-D array over the batch axes) places the Rollout's rows where their prompts' rows live, so each
    process finds the samples of its own prompts among its local rows. `vision_features`: the
    prompts' visual tokens from a frozen tower, computed once outside (`rl.frozen_vision_features`)
    and shared with the scoring; None runs the tower here.
    """
    c = model.config
    n_new = config.max_new_tokens
    imagery = config.imagery and c.latent_start_token_id is not None
    latent_size = config.latent_size if imagery else 0
    slots = config.max_latent_blocks * latent_size if imagery else 1
    prompts, prompt_len = prompt.input_ids.shape
    variables = {"params": params}

    cache, mask, hidden = prefill(params, prompt, model, n_new, num_samples, vision_features)
    # The token loop runs the layers unrolled, each with its weights and its cache in buffers of their
    # own (split once, here): a scanned layer would copy its slice of both out of the stacks per token.
    decoder = model.clone(config=c.replace(scan_layers=False))
    cache = cache.unstack()
    decode_variables = {"params": {**params, "language_model": unstack_layers(params["language_model"])}}
    rope_deltas = jnp.repeat(prompt.rope_deltas, num_samples)
    batch = prompts * num_samples
    chex.assert_shape(hidden, (batch, c.text.hidden_size))
    if row_ids is None:
        step_key = functools.partial(jax.random.fold_in, key)  # one key per step for the whole batch
    else:
        prompt_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, row_ids)
        sample_keys = jax.vmap(jax.random.fold_in)(prompt_keys[jnp.arange(batch) // num_samples],
                                                   jnp.arange(batch) % num_samples)
        step_key = lambda step: jax.vmap(jax.random.fold_in, (0, None))(sample_keys, step)  # noqa: E731

    def next_token(hidden, blocks, step_key):
        logits = model.apply(variables, hidden, method=Qwen25VL.logits).astype(jnp.float32)
        allowed = logits
        if config.block_media_tokens:
            allowed = allowed.at[:, jnp.array([c.image_token_id, c.video_token_id])].set(-jnp.inf)
        if imagery:  # pads are only ever forced; a row out of blocks may not open another
            allowed = allowed.at[:, c.latent_pad_token_id].set(-jnp.inf)
            allowed = allowed.at[:, c.latent_start_token_id].set(
                jnp.where(blocks >= config.max_latent_blocks, -jnp.inf, logits[:, c.latent_start_token_id]))
        token = choose_tokens(allowed, step_key, config)
        # The model's own log-prob (what a scoring forward computes), not the constrained one.
        return token, token_logprobs(logits, token, config.temperature)

    def stops(tokens, step, token):
        ended = jnp.zeros(batch, bool)
        for eos in config.eos_token_ids:
            ended |= token == eos
        for seq in config.stop_sequences:
            n = len(seq)
            if n > n_new:  # cannot fit in the completion
                continue
            window = jax.lax.dynamic_slice_in_dim(tokens, jnp.maximum(step - n + 1, 0), n, axis=1)
            ended |= (step + 1 >= n) & jnp.all(window == jnp.asarray(seq, jnp.int32), axis=1)
        return ended

    def cond(state):
        return (state["step"] < n_new) & ~jnp.all(state["done"])

    def body(state):
        step, remaining, done = state["step"], state["remaining"], state["done"]
        forced_pad, forced_end = remaining > 1, remaining == 1
        token = state["token"]
        if imagery:
            token = jnp.where(forced_pad, c.latent_pad_token_id, jnp.where(forced_end, c.latent_end_token_id, token))
        live = ~done
        token = jnp.where(live, token, config.pad_token_id)
        forced = (forced_pad | forced_end) & live
        tokens = state["tokens"].at[:, step].set(token)
        logprobs = state["logprobs"].at[:, step].set(jnp.where(forced | done, 0.0, state["logprob"]))
        feed = forced_pad & live
        count = state["latent_count"]
        # One row per sequence written in place (a scatter), not the whole [B, slots, hidden] record per token.
        rows, at = jnp.arange(batch), jnp.minimum(count, slots - 1)
        kept = state["latent_inputs"]
        latent_inputs = kept.at[rows, at].set(jnp.where(feed[:, None], state["hidden"].astype(kept.dtype),
                                                        kept[rows, at]))
        opens = live & (remaining == 0) & (token == c.latent_start_token_id) if imagery else jnp.zeros(batch, bool)
        ended = live & stops(tokens, step, token)

        slot = prompt_len + step
        mask = jax.lax.dynamic_update_slice(state["mask"], live[:, None].astype(jnp.int32), (0, slot))
        positions = rope.text_position_ids(jnp.full((batch, 1), slot), rope_deltas)
        out = decoder.apply(decode_variables, token[:, None], attention_mask=mask, position_ids=positions,
                          latent_embeds=state["hidden"][:, None, :] if imagery else None,
                          kv_cache=state["cache"], cache_index=slot, compute_logits=False)
        hidden = out.hidden_states[:, -1]
        blocks = state["blocks"] + opens
        new_token, new_logprob = next_token(hidden, blocks, step_key(step + 1))
        return dict(
            step=step + 1, token=new_token, logprob=new_logprob, hidden=hidden,
            remaining=jnp.where(remaining > 0, remaining - 1, jnp.where(opens, latent_size + 1, 0)),
            blocks=blocks, done=done | ended, cache=out.kv_cache, mask=mask, tokens=tokens, logprobs=logprobs,
            completion=state["completion"].at[:, step].set(live), forced=state["forced"].at[:, step].set(forced),
            latent_inputs=latent_inputs, latent_count=count + feed,
        )

    blocks = jnp.zeros(batch, jnp.int32)
    first, first_logprob = next_token(hidden, blocks, step_key(0))
    state = dict(
        step=jnp.int32(0), token=first, logprob=first_logprob, hidden=hidden, remaining=jnp.zeros(batch, jnp.int32),
        blocks=blocks, done=jnp.zeros(batch, bool), cache=cache, mask=mask,
        tokens=jnp.full((batch, n_new), config.pad_token_id, jnp.int32), logprobs=jnp.zeros((batch, n_new)),
        completion=jnp.zeros((batch, n_new), bool), forced=jnp.zeros((batch, n_new), bool),
        latent_inputs=jnp.zeros((batch, slots, c.text.hidden_size), hidden.dtype),
        latent_count=jnp.zeros(batch, jnp.int32),
    )
    state = jax.lax.while_loop(cond, body, state)
    rollout = Rollout(tokens=state["tokens"], logprobs=state["logprobs"], completion_mask=state["completion"],
                      forced_mask=state["forced"], latent_inputs=state["latent_inputs"])
    if row_sharding is None:
        return rollout
    rows = lambda x: NamedSharding(row_sharding.mesh, PartitionSpec(row_sharding.spec[0], *(None,) * (x.ndim - 1)))  # noqa: E731
    return jax.tree_util.tree_map(lambda x: jax.lax.with_sharding_constraint(x, rows(x)), rollout)


def greedy_generate(
    params: Any,
    prompt: PreparedInputs,
    *,
    model: Qwen25VL,
    max_new_tokens: int,
    eos_token_id: int = -1,
    pad_token_id: int = 0,
) -> jax.Array:
    """Greedy continuation [B, max_new_tokens] of plain text, unconstrained like `transformers`
    `generate(do_sample=False)` (no imagery blocks); after EOS a row is filled with `pad_token_id`."""
    config = SamplingConfig(max_new_tokens=max_new_tokens, eos_token_ids=(eos_token_id,) if eos_token_id >= 0 else (),
                            pad_token_id=pad_token_id, imagery=False, block_media_tokens=False)
    return generate(params, prompt, jax.random.key(0), model=model, config=config).tokens
