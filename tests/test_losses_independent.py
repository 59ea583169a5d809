"""The losses checked against independent arithmetic: every expected value here is computed in
numpy in this file (from the model's own forward outputs), not with the package's loss code.

DIFT (SPEC 3.3): h[p-1] scored against the target fed at pad p, the CE mask rebuilt from the
token ids, the configured weights. GRPO (SPEC 3.5): PPO clipping on both sides, k1 / k3, both
aggregations, the sign of the surrogate. 4DRL scoring: a rollout that opened an imagery block
re-scored exactly by the forward that feeds the stored hidden states.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import Row, make_batch
from run_configs import load_config, tiny_records

from fourd_jax import sharding
from fourd_jax.data.pipeline import build_dataset
from fourd_jax.model.apply import init_params
from fourd_jax.model.config import PRESETS
from fourd_jax.model.inputs import vision_inputs
from fourd_jax.model.vlm import Qwen25VL
from fourd_jax.sample import SamplingConfig, generate, prepare_prompt
from fourd_jax.train import dift, rl
from fourd_jax.train.settings import DiftLossConfig, GrpoConfig, RunSettings

# ----------------------------------------------------------------------------- numpy references


def np_log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def find_last(row: np.ndarray, pattern: list[int]) -> int:
    """Index just past the last occurrence of `pattern` in `row` (-1 when absent)."""
    n = len(pattern)
    hits = [i for i in range(len(row) - n + 1) if row[i:i + n].tolist() == pattern]
    return hits[-1] + n if hits else -1


# ----------------------------------------------------------------------------- DIFT

LATENT_SIZE = 4  # fourd_jax/configs/dift.py data.latent_size


@pytest.fixture(scope="module")
def dift_case(tmp_path_factory):
    """A pipeline batch with imagery latents, the initial params, and the expected DIFT terms
    computed in numpy from the model's own hidden states and logits."""
    path, tokenizer = tiny_records(tmp_path_factory.mktemp("losses_data"), seed=5)
    config = load_config("dift", **{"data.seq_buckets": (1024,)})
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    trainer = dift.make_trainer(RunSettings.of(config), tokenizer, mesh)
    model, c = trainer.model, trainer.model.config
    params = jax.tree_util.tree_map(np.asarray, trainer.state.params)  # before any (donating) step
    batch = next(b for b in build_dataset(path / "train", tokenizer, c, RunSettings.of(config).pipeline())
                 if b["latent_mask"].any())
    sizes = dift.StaticSizes.of(batch)
    ids, attention = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"])
    start, pad, end = c.latent_start_token_id, c.latent_pad_token_id, c.latent_end_token_id
    rows, length = ids.shape

    # Imagery targets: each image's merged tower tokens, trimmed to a multiple of latent_size,
    # mean-pooled in latent_size contiguous chunks; in order, one per latent pad of the row.
    tokens = np.asarray(model.apply({"params": params}, vision_inputs(
        {**batch, "imagery_frame_len": sizes.imagery_frame_len}, "imagery"), method=Qwen25VL.encode_vision),
        np.float64)
    merge = c.vision.spatial_merge_size ** 2
    pads_per_row = (ids == pad).sum(1)
    targets = np.zeros((rows, max(int(pads_per_row.max()), 1), c.text.hidden_size))
    for b in range(rows):
        images = int(pads_per_row[b]) // LATENT_SIZE
        if not images:
            continue
        per_image = int(np.asarray(batch["imagery_valid"][b]).sum()) // merge // images  # equal-size images
        chunk = per_image // LATENT_SIZE
        for i in range(images):
            for k in range(LATENT_SIZE):
                first = i * per_image + k * chunk
                targets[b, i * LATENT_SIZE + k] = tokens[b, first:first + chunk].mean(0)

    out = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                      position_ids=batch["position_ids"],
                      vision=vision_inputs({**batch, "video_frame_len": sizes.video_frame_len}, "video"),
                      latent_embeds=jnp.asarray(targets, jnp.float32))
    hidden, logits = np.asarray(out.hidden_states, np.float64), np.asarray(out.logits)

    # Latent loss: mean over every pad p of the batch of 1 - cos(h[p - 1], target of p).
    pad_rows, pad_cols = np.nonzero(ids == pad)
    order = np.concatenate([np.arange(n) for n in pads_per_row])  # k-th pad of its row
    wanted = targets[pad_rows, order]
    latent = np.mean(1.0 - np_cosine(hidden[pad_rows, pad_cols - 1], wanted))
    shifted = np.mean(1.0 - np_cosine(hidden[pad_rows, pad_cols], wanted))  # h[p], the off-by-one

    # CE mask from the token ids: position t is supervised iff token t + 1 lies in the assistant
    # turn (after the last "<|im_start|>assistant\n", through its <|im_end|>) and is not a pad.
    header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    supervised_token = np.zeros_like(ids, bool)
    for b in range(rows):
        first = find_last(ids[b, :attention[b].sum()], header)
        if first < 0:
            continue
        last = first + int(np.argmax(ids[b, first:] == im_end))
        assert ids[b, last] == im_end and attention[b, last] == 1
        supervised_token[b, first:last + 1] = True
    supervised_token &= ids != pad
    mask = np.zeros_like(ids, bool)
    mask[:, :-1] = supervised_token[:, 1:]
    nll = -np.take_along_axis(np_log_softmax(logits[:, :-1]), ids[:, 1:, None], axis=-1)[..., 0]
    ce = (nll * mask[:, :-1]).sum() / mask.sum()
    # The CE a wrong mask would give: the positions predicting <|latent_end|> left out; pads supervised.
    predicts_end = np.zeros_like(mask)
    predicts_end[:, :-1] = ids[:, 1:] == end
    no_end = (nll * (mask & ~predicts_end)[:, :-1]).sum() / (mask & ~predicts_end).sum()
    predicts_pad = np.zeros_like(mask)
    predicts_pad[:, :-1] = ids[:, 1:] == pad
    with_pads = (nll * (mask | predicts_pad)[:, :-1]).sum() / (mask | predicts_pad).sum()

    steps = {}

    def step_metrics(ce_weight, latent_weight):
        """Metrics of the first training step (its loss is taken at the initial params)."""
        if (ce_weight, latent_weight) not in steps:
            t = trainer
            if (ce_weight, latent_weight) != (config.loss.ce_weight, config.loss.latent_weight):
                run = load_config("dift", **{"data.seq_buckets": (1024,), "loss.ce_weight": ce_weight,
                                             "loss.latent_weight": latent_weight})
                t = dift.make_trainer(RunSettings.of(run), tokenizer, mesh)
                jax.tree_util.tree_map(np.testing.assert_array_equal,
                                       jax.tree_util.tree_map(np.asarray, t.state.params),
                                       params)  # the same initial params as the expected values'
            _, metrics = t.step_fn(t.state, batch)
            steps[ce_weight, latent_weight] = {k: float(v) for k, v in jax.device_get(metrics).items()}
        return steps[ce_weight, latent_weight]

    return dict(batch=batch, ids=ids, mask=mask, latent=latent, shifted=shifted, ce=ce, no_end=no_end,
                with_pads=with_pads, latent_ids=(start, pad, end), step_metrics=step_metrics)


def test_dift_latent_loss_scores_the_hidden_state_before_each_pad(dift_case):
    metrics = dift_case["step_metrics"](0.1, 1.0)
    assert metrics["latent_targets"] == (dift_case["ids"] == dift_case["latent_ids"][1]).sum() > 0
    np.testing.assert_allclose(metrics["latent_loss"], dift_case["latent"], rtol=1e-5)
    # h[p] instead of h[p - 1] would be off by far more than the tolerance.
    assert abs(dift_case["shifted"] - dift_case["latent"]) > 100 * 1e-5 * dift_case["latent"]


def test_dift_cross_entropy_mask_from_the_token_ids(dift_case):
    ids, mask = dift_case["ids"], dift_case["mask"]
    start, pad, end = dift_case["latent_ids"]
    predicted = np.zeros_like(ids)
    predicted[:, :-1] = ids[:, 1:]
    # The mask built here: latent_start and latent_end predicted (the last pad of a block predicts
    # latent_end and is supervised), pads never; prompt and padding positions are unsupervised.
    assert mask[predicted == start].all() and mask[predicted == end].all() and (predicted == end).any()
    last_pads = (ids == pad) & (predicted == end)
    assert last_pads.any() and mask[last_pads].all()
    assert not mask[predicted == pad].any()
    assert not mask[np.asarray(dift_case["batch"]["attention_mask"]) == 0].any()
    np.testing.assert_array_equal(np.asarray(dift_case["batch"]["loss_mask"], bool), mask)
    metrics = dift_case["step_metrics"](0.1, 1.0)
    assert metrics["ce_tokens"] == mask.sum()
    np.testing.assert_allclose(metrics["ce"], dift_case["ce"], rtol=1e-5)
    for wrong in (dift_case["no_end"], dift_case["with_pads"]):  # the test tells these masks apart:
        # the step's CE is ten times closer to the right mask's value than to either wrong one's
        assert 10 * abs(metrics["ce"] - dift_case["ce"]) < abs(metrics["ce"] - wrong)


@pytest.mark.parametrize("weights", [(0.1, 1.0), (0.7, 0.25)])
def test_dift_total_is_the_configured_weighted_sum(dift_case, weights):
    ce_weight, latent_weight = weights
    metrics = dift_case["step_metrics"](ce_weight, latent_weight)
    np.testing.assert_allclose(metrics["loss"], ce_weight * dift_case["ce"] + latent_weight * dift_case["latent"],
                               rtol=1e-5)


def test_dift_config_weights_are_the_spec_recipe():
    config = load_config("dift")
    assert (config.loss.ce_weight, config.loss.latent_weight) == (0.1, 1.0)
    assert (DiftLossConfig().ce_weight, DiftLossConfig().latent_weight) == (0.1, 1.0)


# ----------------------------------------------------------------------------- GRPO objective

EPS = 0.2
ADVANTAGES = np.array([1.3, -0.7, 0.4, -1.1])
# Ratios new / old per token: above 1 + eps and below 1 - eps for both advantage signs, inside
# the trust region, and extreme values at masked positions (which must not count).
RATIOS = np.array([[1.5, 0.5, 1.1, 1.0, 3.0],
                   [0.5, 1.5, 0.9, 0.7, 0.1],
                   [1.25, 0.75, 1.0, 1.19, 0.81],
                   [1.3, 0.6, 1.05, 0.95, 1.0]])
MASK = np.array([[1, 1, 1, 1, 0],
                 [1, 1, 1, 1, 0],
                 [1, 1, 1, 1, 1],
                 [1, 1, 0, 0, 0]], bool)


def grpo_arrays(seed=0):
    rs = np.random.RandomState(seed)
    logp = -rs.uniform(0.1, 4.0, RATIOS.shape)
    old = logp - np.log(RATIOS)
    ref = logp + rs.uniform(-0.6, 0.6, RATIOS.shape)
    return logp, old, ref


def np_grpo(logp, old, ref, adv, mask, *, beta, estimator, aggregation, eps=EPS):
    """(loss, d loss / d logp) of the PPO-clipped surrogate + beta * KL, in float64."""
    r = np.exp(logp - old)
    a = adv[:, None]
    surrogate = -np.minimum(r * a, np.clip(r, 1 - eps, 1 + eps) * a)
    log_ratio = ref - logp
    kl = logp - ref if estimator == "k1" else np.exp(log_ratio) - log_ratio - 1
    dkl = np.ones_like(logp) if estimator == "k1" else 1 - np.exp(log_ratio)
    per_token = surrogate + beta * kl
    # Where the clipped term is the smaller one the ratio's gradient is cut: nothing flows.
    cut = ((a > 0) & (r > 1 + eps)) | ((a < 0) & (r < 1 - eps))
    dper = np.where(cut, 0.0, -a * r) + beta * dkl
    m = mask.astype(np.float64)
    if aggregation == "sequence-mean":
        weights = m / m.sum(1, keepdims=True) / len(m)
    else:
        weights = m / m.sum()
    return (per_token * weights).sum(), dper * weights, (kl * m).sum() / m.sum()


def grpo(logp, old, ref, adv, mask, config):
    def loss(logp):
        return rl.grpo_objective(logp, old_logprobs=None if old is None else jnp.asarray(old, jnp.float32),
                                 ref_logprobs=None if ref is None else jnp.asarray(ref, jnp.float32),
                                 advantages=jnp.asarray(adv, jnp.float32), mask=jnp.asarray(mask), config=config)
    (value, aux), grad = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(logp, jnp.float32))
    return float(value), np.asarray(grad, np.float64), {k: float(v) for k, v in aux.items()}


@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("aggregation", ["sequence-mean", "token-mean"])
def test_grpo_objective_equals_numpy_ppo(estimator, aggregation):
    logp, old, ref = grpo_arrays()
    beta = 0.04
    config = GrpoConfig(num_generations=2, epsilon=EPS, beta=beta, kl_estimator=estimator,
                           aggregation=aggregation)
    want, want_grad, want_kl = np_grpo(logp, old, ref, ADVANTAGES, MASK, beta=beta, estimator=estimator,
                                       aggregation=aggregation)
    value, grad, aux = grpo(logp, old, ref, ADVANTAGES, MASK, config)
    np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(aux["kl"], want_kl, rtol=1e-5, atol=1e-7)
    assert (grad[~MASK] == 0).all()
    # The other aggregation, no clipping, or the other estimator would each give another value.
    other = "token-mean" if aggregation == "sequence-mean" else "sequence-mean"
    assert abs(np_grpo(logp, old, ref, ADVANTAGES, MASK, beta=beta, estimator=estimator, aggregation=other)[0]
               - want) > 1e-3
    assert abs(np_grpo(logp, old, ref, ADVANTAGES, MASK, beta=beta, estimator=estimator, aggregation=aggregation,
                       eps=10.0)[0] - want) > 1e-3
    assert abs(np_grpo(logp, old, ref, ADVANTAGES, MASK, beta=beta, estimator={"k1": "k3", "k3": "k1"}[estimator],
                       aggregation=aggregation)[0] - want) > 1e-3


def test_grpo_clipping_acts_on_both_sides():
    logp, old, _ = grpo_arrays()
    config = GrpoConfig(num_generations=2, epsilon=EPS, beta=0.0)
    value, grad, _ = grpo(logp, old, None, ADVANTAGES, MASK, config)
    n = MASK.sum(1, keepdims=True) * len(MASK)  # sequence-mean weights
    # Positive advantage, ratio 1.5 > 1 + eps: the loss holds at -(1 + eps) * A, no gradient.
    # Negative advantage, ratio 0.5 < 1 - eps: held at -(1 - eps) * A, no gradient.
    for b, t in [(0, 0), (2, 0), (1, 0), (1, 3), (3, 1)]:
        assert grad[b, t] == 0, (b, t)
    # Positive advantage below 1 - eps, negative above 1 + eps, and inside: -r * A, unclipped.
    for b, t in [(0, 1), (2, 1), (1, 1), (3, 0), (0, 2), (1, 2), (2, 3), (2, 4)]:
        np.testing.assert_allclose(grad[b, t], -RATIOS[b, t] * ADVANTAGES[b] / n[b, 0], rtol=1e-5)
    per_token = np.where(MASK, -np.minimum(RATIOS * ADVANTAGES[:, None],
                                           np.clip(RATIOS, 1 - EPS, 1 + EPS) * ADVANTAGES[:, None]), 0)
    np.testing.assert_allclose([per_token[0, 0], per_token[1, 0]], [-1.2 * 1.3, 0.8 * 0.7])
    np.testing.assert_allclose(value, np.mean(per_token.sum(1) / MASK.sum(1)), rtol=1e-5)


def test_grpo_surrogate_raises_the_log_prob_of_positive_advantage_tokens():
    """First iteration (old = the policy itself, ratio 1): d loss / d logp = -A / tokens, so a
    gradient step on the loss raises the log-probs of positive-advantage tokens and lowers the others."""
    logp, _, _ = grpo_arrays(1)
    for aggregation in ("sequence-mean", "token-mean"):
        config = GrpoConfig(num_generations=2, epsilon=EPS, beta=0.0, aggregation=aggregation)
        value, grad, _ = grpo(logp, None, None, ADVANTAGES, MASK, config)
        weights = MASK / MASK.sum(1, keepdims=True) / len(MASK) if aggregation == "sequence-mean" \
            else MASK / MASK.sum()
        np.testing.assert_allclose(grad, -ADVANTAGES[:, None] * weights, rtol=1e-6)
        np.testing.assert_allclose(value, -(ADVANTAGES[:, None] * weights).sum(), rtol=1e-6)
        positive = MASK & (ADVANTAGES[:, None] > 0)
        negative = MASK & (ADVANTAGES[:, None] < 0)
        assert (grad[positive] < 0).all() and (grad[negative] > 0).all()
        stepped = logp - 0.1 * grad  # one descent step on the loss
        assert (stepped[positive] > logp[positive]).all() and (stepped[negative] < logp[negative]).all()
        assert grpo(stepped, logp, None, ADVANTAGES, MASK, config)[0] < value


# ----------------------------------------------------------------------------- imagery rollouts re-scored

START, PAD, END = 100, 101, 102


@pytest.fixture(scope="module")
def imagery_policy():
    """A tiny random model whose LM head makes <|latent_start|> the whole top-p nucleus at the
    end of each prompt, so every row opens an imagery block first."""
    config = PRESETS["tiny"](vocab_size=256, latent_start_token_id=START, latent_pad_token_id=PAD,
                             latent_end_token_id=END)
    model = Qwen25VL(config)
    params = init_params(model, jax.random.key(11))
    rows = [Row([("text", 5), ("video", (2, 4, 4), 2.0), ("text", 4)]), Row([("text", 7)])]
    prompt = prepare_prompt(model, **make_batch(config, rows, seed=6))
    last = np.asarray(model.apply({"params": params}, prompt.input_ids, prompt.attention_mask,
                                  position_ids=prompt.position_ids, vision=prompt.vision,
                                  compute_logits=False).hidden_states[:, -1], np.float64)
    embedding = np.array(params["language_model"]["embed_tokens"]["embedding"])  # tied: the LM head too
    embedding[START] = 9.0 * np.linalg.pinv(last) @ np.ones(len(last))  # logit 9 at each prompt's end
    params = jax.tree_util.tree_map(lambda x: x, params)
    params["language_model"]["embed_tokens"]["embedding"] = jnp.asarray(embedding, jnp.float32)
    return model, params, prompt


def test_rollout_with_an_imagery_block_is_rescored_exactly(imagery_policy):
    model, params, prompt = imagery_policy
    latent_size = 3
    config = SamplingConfig(max_new_tokens=14, temperature=1.0, top_p=0.9, latent_size=latent_size,
                            max_latent_blocks=1)
    rollout = generate(params, prompt, jax.random.key(5), model=model, config=config)
    tokens, forced = np.asarray(rollout.tokens), np.asarray(rollout.forced_mask)
    block = [START] + [PAD] * latent_size + [END]
    assert (tokens[:, :len(block)] == block).all(), tokens  # every row opened a block first
    after = np.zeros_like(forced)
    after[:, len(block):] = True
    text = after & np.asarray(rollout.completion_mask) & ~forced
    assert (text.sum(1) >= 5).all() and not np.isin(tokens[text], block).any()

    inputs = rl.scoring_inputs(prompt, rollout, 1)
    n = tokens.shape[1]
    scored = np.asarray(jax.jit(rl.completion_logprobs, static_argnums=(1, 4, 5))(
        params, model, prompt, rollout, 1, config.temperature))
    sampled = np.asarray(rollout.logprobs)
    np.testing.assert_allclose(scored[text], sampled[text], atol=1e-5, rtol=0)
    # The same from the forward's logits, log-softmaxed here: position t predicts token t + 1.
    logits = np.asarray(model.apply({"params": params}, inputs.input_ids, inputs.attention_mask,
                                    position_ids=inputs.position_ids, vision=inputs.vision,
                                    latent_embeds=rollout.latent_inputs).logits)
    length = inputs.input_ids.shape[1]
    ours = np.take_along_axis(np_log_softmax(logits[:, length - n - 1:length - 1]), tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(ours[text], sampled[text], atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours[:, 0], sampled[:, 0], atol=1e-5, rtol=0)  # the sampled latent_start too
    # Scoring with the <|latent_pad|> token embedding (the upstream flaw) would not be the sampled policy.
    flawed = np.asarray(model.apply({"params": params}, inputs.input_ids, inputs.attention_mask,
                                    position_ids=inputs.position_ids, vision=inputs.vision).logits)
    flawed = np.take_along_axis(np_log_softmax(flawed[:, length - n - 1:length - 1]), tokens[..., None], -1)[..., 0]
    assert np.abs(flawed[text] - sampled[text]).max() > 1e-3


def test_logprob_drift_counts_drawn_tokens_only_even_with_the_latent_gradient(imagery_policy):
    """With the policy gradient on latent tokens too (study arm rl_full), the loss mask holds the
    forced pads and ends, which have no sampler log-prob; the drift check must still read 0."""
    model, params, prompt = imagery_policy
    config = SamplingConfig(max_new_tokens=14, temperature=1.0, top_p=0.9, latent_size=3, max_latent_blocks=1)
    rollout = generate(params, prompt, jax.random.key(5), model=model, config=config, num_samples=2)
    forced = np.asarray(rollout.forced_mask)
    full = rollout.completion_mask  # rl.latent_gradient=True: every completion token
    assert (forced & np.asarray(full)).any()
    grpo_config = GrpoConfig(num_generations=2, epsilon=EPS, beta=0.0)  # the advantages are given
    _, aux = rl.grpo_loss(params, model=model, prompt=prompt, rollout=rollout,
                          mask=full, advantages=jnp.array([1.0, -1.0, 1.0, -1.0]), old_logprobs=None, ref_logprobs=None,
                          config=grpo_config)
    assert float(aux["logprob_drift"]) <= 1e-5
    # ...while the scored log-probs of the forced tokens are far from the 0 the sampler wrote there.
    assert np.abs(np.asarray(aux["logp"])[forced]).max() > 1.0
