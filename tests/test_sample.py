"""The jitted sampler: top-k / top-p filtering, seeded sampling, EOS and stop sequences, and
imagery decoding (latent blocks fed with hidden states, returned with the tokens)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import Row, make_batch

from fourd_jax.model.apply import init_params
from fourd_jax.model.config import PRESETS
from fourd_jax.model.vlm import Qwen25VL
from fourd_jax.sample import SamplingConfig, filter_logits, generate, prepare_prompt
from fourd_jax.train.rl import scoring_inputs

LATENT = (100, 101, 102)  # start, pad, end
LATENT_SIZE = 3


@pytest.fixture(scope="module")
def policy():
    """A tiny random model whose LM head favours <|latent_start|> enough to open blocks often."""
    config = PRESETS["tiny"](vocab_size=256, latent_start_token_id=LATENT[0], latent_pad_token_id=LATENT[1],
                             latent_end_token_id=LATENT[2])
    model = Qwen25VL(config)
    params = init_params(model, jax.random.key(3))
    rows = [Row([("text", 5), ("video", (2, 4, 4), 2.0), ("text", 4)]), Row([("text", 7)])]
    batch = make_batch(config, rows * 2, seed=4)  # each prompt twice: rows sample independently
    prompt = prepare_prompt(model, **batch)
    hidden = model.apply({"params": params}, prompt.input_ids, prompt.attention_mask, position_ids=prompt.position_ids,
                         vision=prompt.vision, compute_logits=False).hidden_states
    direction = jnp.mean(hidden[:, -1], axis=0)
    embedding = params["language_model"]["embed_tokens"]["embedding"]  # tied: the LM head too
    embedding = embedding.at[LATENT[0]].set(4.0 * direction / jnp.linalg.norm(direction) ** 2)
    params = jax.tree_util.tree_map(lambda x: x, params)
    params["language_model"]["embed_tokens"]["embedding"] = embedding
    return model, params, prompt


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = jnp.log(jnp.array([[0.1, 0.4, 0.2, 0.3]]))
    kept = lambda **kw: np.isfinite(np.asarray(filter_logits(logits, 1.0, **kw)))[0].tolist()  # noqa: E731
    assert kept(top_k=2, top_p=1.0) == [False, True, False, True]
    assert kept(top_k=0, top_p=0.5) == [False, True, False, True]  # 0.4 + 0.3 is the smallest set >= 0.5
    assert kept(top_k=0, top_p=0.3) == [False, True, False, False]  # the top token always stays
    assert kept(top_k=3, top_p=0.75) == [False, True, False, True]  # nucleus of the renormalised top 3
    assert kept(top_k=3, top_p=0.8) == [False, True, True, True]


@pytest.mark.parametrize("scale", [0.1, 8.0])  # flat: the full sort; peaked: the top candidates suffice
def test_nucleus_from_candidates_equals_the_full_sort(scale):
    logits = scale * jax.random.normal(jax.random.key(0), (3, 5000))
    got = np.isfinite(np.asarray(filter_logits(logits, 1.0, top_k=0, top_p=0.9)))
    probs = np.asarray(jax.nn.softmax(logits, -1), np.float64)
    for row, p in enumerate(probs):
        order = np.argsort(-p)
        before = np.cumsum(p[order]) - p[order]
        want = np.zeros_like(got[row])
        want[order[before < 0.9]] = True
        np.testing.assert_array_equal(got[row], want)
    assert (got.sum(1) < 64).all() if scale > 1 else (got.sum(1) > 64).all()


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.99])
def test_nucleus_by_bisection_keeps_the_tokens_below_top_p_mass(top_p):
    """The bisection keeps a token when the mass above it is under top_p: ties stay together,
    suppressed (-inf) tokens never stay, and the top token always does."""
    from fourd_jax.sample import nucleus_by_bisection

    logits = 0.5 * jax.random.normal(jax.random.key(1), (4, 3000))
    logits = logits.at[:, :40].set(logits[:, 40:41])  # a tie group of 41 tokens per row
    logits = logits.at[:, 100:200].set(-jnp.inf)  # suppressed tokens
    logits = logits.at[3].set(logits[3] * 40.0)  # one peaked row
    threshold = nucleus_by_bisection(logits, jax.nn.logsumexp(logits, -1, keepdims=True), top_p)
    got = np.asarray(logits >= threshold)
    for row, values in enumerate(np.asarray(logits, np.float64)):
        p = np.exp(values - values.max())
        p /= p.sum()
        above = np.array([p[values > v].sum() for v in values])
        np.testing.assert_array_equal(got[row], above < top_p)
        assert got[row, np.argmax(values)] and not got[row, 100:200].any()


def test_sampling_is_seeded_and_top_k_1_is_greedy(policy):
    model, params, prompt = policy
    free = SamplingConfig(max_new_tokens=12, temperature=1.0, imagery=False)
    a = generate(params, prompt, jax.random.key(0), model=model, config=free, num_samples=3).tokens
    b = generate(params, prompt, jax.random.key(0), model=model, config=free, num_samples=3).tokens
    c = generate(params, prompt, jax.random.key(1), model=model, config=free, num_samples=3).tokens
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a[0], a[1])  # the samples of one prompt differ
    greedy = generate(params, prompt, jax.random.key(0), model=model,
                      config=SamplingConfig(max_new_tokens=12, imagery=False)).tokens
    top1 = generate(params, prompt, jax.random.key(5), model=model,
                    config=SamplingConfig(max_new_tokens=12, temperature=0.7, top_k=1, imagery=False)).tokens
    np.testing.assert_array_equal(greedy, top1)
    # One prefill shared by the samples of a prompt: greedy samples repeat the prompt's continuation.
    shared = generate(params, prompt, jax.random.key(0), model=model,
                      config=SamplingConfig(max_new_tokens=12, imagery=False), num_samples=2).tokens
    np.testing.assert_array_equal(np.asarray(shared), np.repeat(np.asarray(greedy), 2, axis=0))


def test_eos_and_stop_sequences_end_rows(policy):
    model, params, prompt = policy
    base = SamplingConfig(max_new_tokens=10, imagery=False, pad_token_id=7)
    free = np.asarray(generate(params, prompt, jax.random.key(0), model=model, config=base).tokens)
    eos = int(free[0, 3])
    ended = generate(params, prompt, jax.random.key(0), model=model,
                     config=SamplingConfig(max_new_tokens=10, imagery=False, pad_token_id=7, eos_token_ids=(eos,)))
    first = int(np.argmax(free[0] == eos))  # the first time row 0 emits it (<= 3)
    np.testing.assert_array_equal(np.asarray(ended.tokens)[0, :first + 1], free[0, :first + 1])
    assert (np.asarray(ended.tokens)[0, first + 1:] == 7).all()
    assert np.asarray(ended.completion_mask)[0].sum() == first + 1
    stop = (int(free[1, 1]), int(free[1, 2]))
    stopped = generate(params, prompt, jax.random.key(0), model=model,
                       config=SamplingConfig(max_new_tokens=10, imagery=False, pad_token_id=7,
                                             stop_sequences=(stop,)))
    mask = np.asarray(stopped.completion_mask)[1]
    windows = [tuple(free[1, i:i + 2]) for i in range(9)]
    assert mask.sum() == windows.index(stop) + 2  # up to and including the stop sequence


def test_imagery_blocks_feed_hidden_states(policy):
    model, params, prompt = policy
    config = SamplingConfig(max_new_tokens=24, temperature=1.0, latent_size=LATENT_SIZE, max_latent_blocks=2)
    rollout = generate(params, prompt, jax.random.key(2), model=model, config=config)
    tokens, forced = np.asarray(rollout.tokens), np.asarray(rollout.forced_mask)
    assert forced.any(), "no latent block was opened: the test would check nothing"
    for row, forced_row in zip(tokens, forced, strict=True):
        starts = np.flatnonzero(row == LATENT[0])
        assert len(starts) <= config.max_latent_blocks
        for s in starts:  # start, then latent_size pads, then the forced end (unless cut by the length)
            block = row[s + 1:s + 2 + LATENT_SIZE]
            want = [LATENT[1]] * LATENT_SIZE + [LATENT[2]]
            assert block.tolist() == want[:len(block)]
            assert forced_row[s + 1:s + 2 + LATENT_SIZE].all() and not forced_row[s]
        # Pads are only ever forced; forced tokens are pads and the ends that close blocks.
        assert forced_row[row == LATENT[1]].all()
        assert (row == LATENT[1]).sum() + forced_row[row == LATENT[2]].sum() == forced_row.sum()
    assert (np.asarray(rollout.logprobs)[forced] == 0).all()
    # Each fed vector is the final hidden state one position earlier in the sampled sequence.
    inputs = scoring_inputs(prompt, rollout, 1)
    hidden = model.apply({"params": params}, inputs.input_ids, inputs.attention_mask,
                         position_ids=inputs.position_ids, vision=inputs.vision,
                         latent_embeds=rollout.latent_inputs, compute_logits=False).hidden_states
    prompt_len = prompt.input_ids.shape[1]
    fed = np.asarray(rollout.latent_inputs)
    for row in range(tokens.shape[0]):
        pads = np.flatnonzero(tokens[row] == LATENT[1])
        for k, p in enumerate(pads):
            np.testing.assert_allclose(fed[row, k], np.asarray(hidden[row, prompt_len + p - 1]), atol=2e-5)
        assert not fed[row, len(pads):].any()


def test_the_token_loop_copies_neither_weights_nor_the_cache(policy):
    """Each decode step reads every layer's weights and cache where they lie: the loop runs the layers unrolled on
    weights split from the stack once, before it (a scanned layer copies its slice of the stacked weights out at
    every token), and writes the new token into each layer's cache in place (attending over the updated cache
    made XLA copy the whole cache, once per consumer, at every token)."""
    model, params, prompt = policy
    c = model.config
    config = SamplingConfig(max_new_tokens=6, pad_token_id=0, imagery=False)
    hlo = generate.lower(params, prompt, jax.random.key(0), model=model, config=config).compile().as_text()
    rows, slots = prompt.input_ids.shape[0], prompt.input_ids.shape[1] + 6
    layer_cache = f"f32[{rows},{c.text.num_kv_heads},{slots},{c.text.head_dim}]"
    assert f"{layer_cache}{{3,2,1,0}} copy(" not in hlo and f"{layer_cache} copy(" not in hlo
    mlp = c.text.intermediate_size * c.text.hidden_size
    in_loop_slices = [line for line in hlo.splitlines()
                      if "jit(generate)/while/body/" in line and (" slice(" in line or "dynamic-slice(" in line)]
    shapes = [line.split("[", 1)[1].split("]", 1)[0] for line in in_loop_slices]
    sizes = [np.prod([int(n) for n in shape.split(",") if n]) for shape in shapes]
    assert not [s for s in sizes if s >= mlp], "a weight matrix is sliced out of the stack inside the token loop"
    assert len(in_loop_slices) > 0  # the check sees the token loop's instructions (e.g. the rotary halves)
