"""4DRL (SPEC 3.5): GRPO whose policy gradient reaches text tokens only.

One step reads like the algorithm:

    rollout    G samples per prompt from the jitted imagery sampler (hidden states fed in latent blocks)
    reward     4DThinker accuracy + format, or the MLLM-4D ST-reward, on the decoded completions
    advantage  (r - mean_group) / (std_group + 1e-4)
    loss       PPO-clipped ratio + beta * KL to the frozen reference, over completion tokens minus
               every latent token, for `num_iterations` updates on the same rollouts

Every log-prob (policy, old policy, reference) is computed on the sequence the sampler produced:
the prompt, the sampled tokens, and at each `<|latent_pad|>` the hidden state the sampler fed
there (`Rollout.latent_inputs`), not the pad token's embedding.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fourd_jax.batch import completion_texts, gather_rows, prompt_inputs, row_sharding, shard_rows
from fourd_jax.errors import InputError
from fourd_jax.files import as_path
from fourd_jax.load import ModelSource, find_model
from fourd_jax.model.inputs import PreparedInputs
from fourd_jax.model.vlm import Qwen25VL
from fourd_jax.sample import Prefilled, Rollout, SamplingConfig, generate, prefill, sampling_for, token_logprobs
from fourd_jax.train import job, observe, rewards
from fourd_jax.train.accumulate import accumulate, merge_rows, split_rows
from fourd_jax.train.job import Trainer
from fourd_jax.train.optim import stop_frozen, trainable_mask
from fourd_jax.train.settings import GrpoConfig, RewardSettings, RunSettings
from fourd_jax.train.state import TrainState, guarded_update

# ----------------------------------------------------------------------------- pure pieces


def group_advantages(rewards_: np.ndarray, group_size: int) -> np.ndarray:
    """(r - group mean) / (group std + 1e-4) over consecutive groups of `group_size` rows.

    The std is the unbiased one (ddof 1), as torch's `std` in the upstream trainers.
    """
    r = np.asarray(rewards_, np.float64).reshape(-1, group_size)
    adv = (r - r.mean(axis=1, keepdims=True)) / (r.std(axis=1, ddof=1, keepdims=True) + 1e-4)
    return adv.reshape(-1).astype(np.float32)


def policy_token_mask(tokens: jax.Array, completion_mask: jax.Array, latent_ids: tuple[int, ...]) -> jax.Array:
    """Completion tokens the policy gradient acts on: up to and including the end, minus every
    latent token (start, pad, end)."""
    mask = completion_mask
    for token_id in latent_ids:
        mask = mask & (tokens != token_id)
    return mask


def scoring_inputs(prompt: PreparedInputs, rollout: Rollout, num_samples: int) -> PreparedInputs:
    """The sampled sequences as one batch: each prompt repeated `num_samples` times, then its
    completion at the cache slots and M-RoPE positions the sampler used."""
    repeat = functools.partial(jnp.repeat, repeats=num_samples, axis=0)
    n_new = rollout.tokens.shape[1]
    prompt_len = prompt.input_ids.shape[1]
    deltas = repeat(prompt.rope_deltas)
    slots = prompt_len + jnp.arange(n_new)[None, :] + deltas[:, None]
    positions = jnp.concatenate([jnp.repeat(prompt.position_ids, num_samples, axis=1),
                                 jnp.broadcast_to(slots[None], (3,) + slots.shape)], axis=2)
    if prompt.vision is not None and prompt.vision.patches.ndim == 2 and num_samples > 1:
        raise InputError("repeating prompts needs per-example media [B, P, C] (the pipeline's batches), not the "
                         "flat processor layout.")
    vision = None if prompt.vision is None else jax.tree_util.tree_map(repeat, prompt.vision)
    return PreparedInputs(
        input_ids=jnp.concatenate([repeat(prompt.input_ids), rollout.tokens], axis=1),
        attention_mask=jnp.concatenate([repeat(prompt.attention_mask).astype(jnp.int32),
                                        rollout.completion_mask.astype(jnp.int32)], axis=1),
        position_ids=positions, rope_deltas=deltas, vision=vision)


def completion_logprobs(params: Any, model: Qwen25VL, prompt: PreparedInputs, rollout: Rollout, num_samples: int,
                        temperature: float, vision_features: jax.Array | None = None,
                        prefilled: Prefilled | None = None) -> jax.Array:
    """log p of each completion token [B x num_samples, N] given everything before it, with the fed
    hidden states at the latent pads: the sequences of `scoring_inputs`, computed as the sampler
    computes them. Each prompt (and its media) runs once into a KV cache (`sample.prefill`); the G
    completions then attend to its repeated keys and values, so the prompt's work, and its gradient,
    is done once per prompt, not once per sample. `vision_features`: the prompts' visual tokens from
    a frozen tower, computed once outside (`frozen_vision_features`). `prefilled`: the prompts already
    run (one row each, `prefill(..., num_samples=1)`), e.g. once for every micro-batch of an update."""
    n_new = rollout.tokens.shape[1]
    prompt_len = prompt.input_ids.shape[1]
    if prefilled is None:
        prefilled = prefill(params, prompt, model, n_new, 1, vision_features)
    cache, mask, last_hidden = prefilled.repeat(num_samples)
    mask = jnp.concatenate([mask[:, :prompt_len], rollout.completion_mask.astype(jnp.int32)], axis=1)
    slots = prompt_len + jnp.arange(n_new)[None, :] + jnp.repeat(prompt.rope_deltas, num_samples)[:, None]
    out = model.apply({"params": params}, rollout.tokens, attention_mask=mask,
                      position_ids=jnp.broadcast_to(slots[None], (3,) + slots.shape), kv_cache=cache,
                      cache_index=prompt_len, latent_embeds=rollout.latent_inputs, compute_logits=False)
    # position t predicts token t + 1: the prompt's last position predicts the first completion token
    hidden = jnp.concatenate([last_hidden[:, None], out.hidden_states[:, :-1]], axis=1)
    logits = model.apply({"params": params}, hidden, method=Qwen25VL.logits)
    return token_logprobs(logits, rollout.tokens, temperature)


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, estimator: str) -> jax.Array:
    """Per-token KL(policy || reference) estimate at the sampled tokens."""
    if estimator == "k1":
        return logp - ref_logp
    log_ratio = ref_logp - logp
    return jnp.exp(log_ratio) - log_ratio - 1.0


def grpo_objective(logp: jax.Array, *, old_logprobs: jax.Array | None, ref_logprobs: jax.Array | None,
                   advantages: jax.Array, mask: jax.Array, config: GrpoConfig,
                   totals: tuple[jax.Array, jax.Array] | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The clipped surrogate + beta * KL from per-token log-probs [B, N], aggregated over `mask`
    (the text completion tokens). old_logprobs None: the first iteration (ratio 1, gradient kept).
    `totals` (sequences, tokens): the whole batch's counts when these rows are one micro-batch of
    it, so that the micro-batches' losses and metrics add up to the batch's; default these rows'."""
    old = jax.lax.stop_gradient(logp) if old_logprobs is None else old_logprobs
    ratio = jnp.exp(logp - old)
    adv = advantages[:, None]
    per_token = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - config.epsilon, 1 + config.epsilon) * adv)
    kl = jnp.zeros_like(logp) if ref_logprobs is None else kl_penalty(logp, ref_logprobs, config.kl_estimator)
    if config.beta:
        per_token = per_token + config.beta * kl
    m = mask.astype(jnp.float32)
    sequences, tokens = batch_totals(mask) if totals is None else totals
    if config.aggregation == "sequence-mean":
        loss = jnp.sum(jnp.sum(per_token * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)) / sequences
    else:
        loss = jnp.sum(per_token * m) / tokens
    clipped = (jnp.abs(ratio - 1.0) > config.epsilon) & mask
    return loss, {"kl": jax.lax.stop_gradient(jnp.sum(kl * m) / tokens), "clip_fraction": jnp.sum(clipped) / tokens}


def batch_totals(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sequences, tokens) that `grpo_objective` divides by: the rows, and the policy tokens (at least 1)."""
    return jnp.asarray(mask.shape[0], jnp.float32), jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)


def grpo_loss(params: Any, *, model: Qwen25VL, prompt: PreparedInputs, rollout: Rollout, mask: jax.Array,
              advantages: jax.Array, old_logprobs: jax.Array | None, ref_logprobs: jax.Array | None,
              config: GrpoConfig, num_samples: int | None = None,
              totals: tuple[jax.Array, jax.Array] | None = None, vision_features: jax.Array | None = None,
              prefilled: Prefilled | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`grpo_objective` on the policy's log-probs of the sampled sequences: `num_samples` rollout
    rows per prompt (default rl.num_generations; fewer for a micro-batch of each group)."""
    n = config.num_generations if num_samples is None else num_samples
    logp = completion_logprobs(params, model, prompt, rollout, n, config.temperature, vision_features, prefilled)
    loss, aux = grpo_objective(logp, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, advantages=advantages,
                               mask=mask, config=config, totals=totals)
    fixed = jax.lax.stop_gradient(logp)
    # Sampler vs recomputed log-probs at the same params, on every token the sampler drew: 0 up to
    # float error when the scored sequence is the sampled one. Forced tokens (latent pads and ends)
    # have no sampler log-prob (it writes 0 there), so they stay out even when `mask` holds them.
    drawn = rollout.completion_mask & ~rollout.forced_mask
    aux["logprob_drift"] = jnp.max(jnp.where(drawn, jnp.abs(fixed - rollout.logprobs), 0.0))
    aux["logp"] = fixed
    return loss, aux


def frozen_vision_features(params: Any, trainable: Any, model: Qwen25VL, prompt: PreparedInputs) -> jax.Array | None:
    """The prompts' merged visual tokens, once, when no vision-tower parameter is trained (the
    default freeze); None (the tower runs inside the differentiated forward) otherwise."""
    if prompt.vision is None or any(jax.tree_util.tree_leaves(trainable.get("visual", {}))):
        return None
    return jax.lax.stop_gradient(model.apply({"params": params}, prompt.vision, method=Qwen25VL.encode_vision))


def update_step(state: TrainState, prompt: PreparedInputs, rollout: Rollout, advantages: jax.Array,
                ref_logprobs: jax.Array | None, vision_features: jax.Array | None = None, *, model: Qwen25VL,
                tx: optax.GradientTransformation, trainable: Any, config: GrpoConfig,
                micro_batches: int = 1) -> tuple[TrainState, dict[str, jax.Array]]:
    """`num_iterations` guarded optimizer updates on one rollout batch (one loop step).

    `vision_features`: the prompts' visual tokens from the frozen tower, when the caller has them
    (`step_fn` computes them once for the rollout, the reference and this update); None computes
    them here when the tower is frozen, or runs the tower inside the gradient when it trains.

    With `micro_batches` k > 1 (optim.grad_accum), micro-batch j scores every prompt with its
    samples j, j + k, ... (G / k of each group) and the gradients are summed: the same update in
    about 1/k of the completions' activation memory. The split is over samples, not prompts, because
    on a pod each device usually holds a single prompt. The prompts still run once per iteration:
    their forward is kept as a VJP, each micro-batch returns the gradient of its loss with respect
    to the prompts' KV cache and last hidden state, and the sum of those is pulled back through the
    prompts once.
    """
    c, g = model.config, config.num_generations
    mask = policy_token_mask(rollout.tokens, rollout.completion_mask,
                             () if config.latent_gradient else (c.latent_token_ids or ()))
    totals = batch_totals(mask)
    k = micro_batches
    if g % k:
        raise InputError(f"{k} micro-batches do not split the {g} samples of each prompt (rl.num_generations).")
    # Frozen tower: the prompts' visual tokens are the same for every micro-batch and iteration.
    features = (frozen_vision_features(state.params, trainable, model, prompt) if vision_features is None
                else vision_features)

    def objective(params, prefix, rows):
        rollout, mask, advantages, ref_logprobs, old = rows
        return grpo_loss(stop_frozen(params, trainable), model=model, prompt=prompt, rollout=rollout, mask=mask,
                         advantages=advantages, old_logprobs=old, ref_logprobs=ref_logprobs, config=config,
                         num_samples=g // k, totals=totals, vision_features=features, prefilled=prefix)

    def gradients(params, old):
        """(loss, aux, grads) of the whole batch, summed over its micro-batches."""
        rows = (rollout, mask, advantages, ref_logprobs, old)
        if k == 1:
            (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(params, None, rows)
            return loss, aux, grads

        def run_prompts(params):
            p = prefill(stop_frozen(params, trainable), prompt, model, rollout.tokens.shape[1], 1, features)
            return (p.cache, p.hidden), p.mask

        (cache, hidden), pull_back, prompt_mask = jax.vjp(run_prompts, params, has_aux=True)
        grad_fn = jax.value_and_grad(lambda p, kv, h, r: objective(p, Prefilled(kv, prompt_mask, h), r),
                                     argnums=(0, 1, 2), has_aux=True)

        def one(micro):
            (loss, aux), (grads, d_cache, d_hidden) = grad_fn(params, cache, hidden, micro)
            # summed in float32 over the micro-batches, whatever the cache's dtype
            prefix = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), (d_cache, d_hidden))
            return (loss, aux["kl"], aux["clip_fraction"], grads, prefix), (aux["logp"], aux["logprob_drift"])

        split = jax.tree_util.tree_map(lambda x: split_rows(x, k), rows)  # row p * G + i -> micro-batch i % k
        (loss, kl, clip_fraction, grads, prefix), (logp, drift) = accumulate(one, split)
        prefix = jax.tree_util.tree_map(lambda d, x: d.astype(x.dtype), prefix, (cache, hidden))
        (through_prompts,) = pull_back(prefix)
        grads = jax.tree_util.tree_map(jnp.add, grads, through_prompts)
        aux = {"kl": kl, "clip_fraction": clip_fraction, "logp": merge_rows(logp), "logprob_drift": jnp.max(drift)}
        return loss, aux, grads

    start, old, first = state, None, None
    for _ in range(config.num_iterations):
        loss, aux, grads = gradients(state.params, old)
        if first is None:
            first, old = aux, aux["logp"]  # log-probs of the params that sampled: the old policy
        state, grad_norm, finite = guarded_update(state, grads, loss, tx)
    state = state.replace(step=start.step + 1)
    metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, "kl": first["kl"],
               "clip_fraction": aux["clip_fraction"], "logprob_drift": first["logprob_drift"],
               "policy_tokens": jnp.sum(mask).astype(jnp.float32),
               "completion_length": jnp.mean(jnp.sum(rollout.completion_mask, axis=1).astype(jnp.float32)),
               "latent_blocks": jnp.mean(jnp.sum(rollout.tokens == (c.latent_start_token_id or -1), axis=1)
                                         .astype(jnp.float32)),
               "tokens": (jnp.sum(prompt.attention_mask) * g + jnp.sum(rollout.completion_mask)).astype(jnp.float32)}
    return state, metrics


# ----------------------------------------------------------------------------- rewards on the host


def sample_reward(family: str, completion: str, answer: str, trace: str, config: RewardSettings
                  ) -> dict[str, float]:
    """The configured reward of one completion. MLLM-4D samples get the ST-reward, whose centre
    truths are read from the sample's reference trace; the rest get the 4DThinker reward."""
    if family == "mllm4d":
        return rewards.st_reward(completion, answer, rewards.parse_centers(trace, "Camera Center"),
                                 rewards.parse_centers(trace, "Object Center"),
                                 format_weight=config.st_format, accuracy_weight=config.st_accuracy,
                                 camera_weight=config.st_camera, object_weight=config.st_object)
    return rewards.fourdthinker_reward(completion, answer, accuracy_weight=config.accuracy,
                                       format_weight=config.format)


REWARD_PARTS = ("reward", "accuracy", "format", "camera", "object")


def reward_metrics(scored: list[dict[str, float]], real: np.ndarray) -> dict[str, float]:
    """`reward`, `reward_std` and the mean of each reward part over the real rows of every process
    (each process scores its own rows; the table is gathered so all log the global numbers)."""
    local = np.array([[s.get(part, np.nan) if r else np.nan for part in REWARD_PARTS]
                      for s, r in zip(scored, real, strict=True)], np.float64).reshape(-1, len(REWARD_PARTS))
    table = gather_rows(local)
    rewards_ = table[:, 0][~np.isnan(table[:, 0])]
    out = {"reward": float(rewards_.mean()) if rewards_.size else 0.0,
           "reward_std": float(rewards_.std()) if rewards_.size else 0.0}
    for column, part in enumerate(REWARD_PARTS[1:], start=1):
        values = table[:, column][~np.isnan(table[:, column])]
        if values.size:
            out[f"reward_{part}"] = float(values.mean())
    return out


# ----------------------------------------------------------------------------- the trainer


def sampling_config(settings: RunSettings, tokenizer: Any, model_config: Any) -> SamplingConfig:
    """How a run's rollouts are sampled (its `sample` settings, with the tokenizer's stop tokens)."""
    knobs = settings.sample
    return sampling_for(tokenizer, model_config, knobs.stop_strings, max_new_tokens=knobs.max_new_tokens,
                        temperature=knobs.temperature, top_p=knobs.top_p, top_k=knobs.top_k, imagery=knobs.imagery,
                        latent_size=settings.data.features.latent_size, max_latent_blocks=knobs.max_latent_blocks)


def jitted_update(settings: RunSettings, model: Qwen25VL, tx: optax.GradientTransformation, trainable: Any,
                  shardings: TrainState):
    """The compiled GRPO update of a run: `update_step` with the state donated and kept on `shardings`
    (what the trainer runs, and what `fourd-jax compile` lowers for a TPU topology)."""
    return jax.jit(functools.partial(update_step, model=model, tx=tx, trainable=trainable, config=settings.rl,
                                     micro_batches=settings.optim.grad_accum),
                   donate_argnums=0, out_shardings=(shardings, None))


def reference_policy(params: Any, dtype: Any) -> Any:
    """The frozen reference's copy of the weights, held in the compute dtype: every layer casts its
    weights to that dtype before use, so the reference's log-probs are the same, in half the memory
    beside a float32 policy trained in bfloat16."""
    return jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def make_rl_trainer(settings: RunSettings, tokenizer: Any, mesh: Any) -> Trainer:
    """Policy from model.init_from (the DIFT checkpoint), its reference copy, and the step."""
    rules, grpo = settings.rules, settings.rl
    model, params = job.model_and_params(settings, tokenizer, mesh)
    tx, shardings, state, schedule = job.optimizer_and_state(settings, model, params, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        reference = (jax.jit(functools.partial(reference_policy, dtype=model.config.jnp_dtype),
                             out_shardings=shardings.params)(params) if grpo.beta else None)
    knobs = settings.sample
    sampling = sampling_config(settings, tokenizer, model.config)
    trainable = trainable_mask(params, settings.optim.freeze)
    update = jitted_update(settings, model, tx, trainable, shardings)
    score = jax.jit(lambda p, prompt, rollout, features: completion_logprobs(
        p, model, prompt, rollout, grpo.num_generations, grpo.temperature, features))
    # The frozen tower's tokens of a batch's prompts, once per step: the rollout, the reference (whose
    # tower is the same frozen one) and the update all take them. None when the tower trains.
    tower = jax.jit(lambda p, prompt: frozen_vision_features(p, trainable, model, prompt))

    def step_fn(state: TrainState, batch: dict[str, Any]) -> tuple[TrainState, dict[str, Any]]:
        g = grpo.num_generations
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            prompt = prompt_inputs(batch, mesh, rules)
            key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
            # Keys per row (its stream position): the same samples on any number of processes. The G
            # samples of a prompt come back on its process, so groups are whole where they are scored.
            features = tower(state.params, prompt)
            rollout = generate(state.params, prompt, key, model=model, config=sampling, num_samples=g,
                               row_ids=shard_rows(batch["stream_position"], mesh, rules),
                               row_sharding=row_sharding(mesh, rules), vision_features=features)
            texts = completion_texts(tokenizer, rollout.tokens, rollout.completion_mask)
            scored = [sample_reward(str(batch["family"][i // g]), text, str(batch["answer"][i // g]),
                                    str(batch["trace"][i // g]), settings.reward) for i, text in enumerate(texts)]
            real = np.repeat(np.asarray(batch["example_mask"], bool), g)
            reward = np.array([s["reward"] for s in scored], np.float32)
            advantages = group_advantages(reward, g) * real  # padding rows of a short batch teach nothing
            adv = shard_rows(advantages, mesh, rules)
            ref = score(reference, prompt, rollout, features) if grpo.beta else None
            state, metrics = update(state, prompt, rollout, adv, ref, features)
        return state, {**metrics, **reward_metrics(scored, real)}

    return Trainer(model, tx, shardings, state, step_fn, schedule,
                   pipeline=settings.pipeline(supervised=False, left_pad=True),
                   flops_fn=flops_fn(model.config, grpo, knobs.max_new_tokens))


def flops_fn(model_config: Any, grpo: GrpoConfig, max_new_tokens: int):
    """Approximate FLOPs of one GRPO step: the policy update (forward + backward) over the G
    sampled sequences, plus the sampler's and the reference's forwards (a third each)."""
    def flops(batch: dict[str, Any]) -> float:
        seq = batch["input_ids"].shape[1] + max_new_tokens
        tokens = (float(np.sum(batch["attention_mask"])) + max_new_tokens * batch["input_ids"].shape[0]) \
            * grpo.num_generations * jax.process_count()
        passes = grpo.num_iterations + (2 if grpo.beta else 1) / 3
        return tokens * observe.decoder_flops_per_token(model_config, seq) * passes
    return flops


def trained_on(source: ModelSource) -> str:
    """The records directory the run that wrote `source` trained on (its workdir's manifest.json),
    or "" when that is not known (an HF directory, a checkpoint without its workdir)."""
    manifest = as_path(source.weights).parent / "manifest.json"  # gs:// too
    if source.kind != "orbax" or not manifest.is_file():
        return ""
    return str(json.loads(manifest.read_text()).get("data", ""))


def train(settings: RunSettings, workdir: str | Path, init: str | None = None, data: str | None = None,
          steps: int | None = None, progress: bool = True) -> TrainState:
    """`fourd-jax rl`: GRPO from the DIFT checkpoint `init` (default model.init_from) until global step
    `steps` (default optim.total_steps), resuming from the latest checkpoint in `workdir` if there is
    one. Without a tokenizer or data of its own, the run takes those of the DIFT workdir."""
    source = find_model(init or settings.model.init_from, "--init")
    changes: dict[str, Any] = {"model.init_from": source.weights}
    if not settings.tokenizer:
        if not source.tokenizer:
            raise InputError(f"no tokenizer found beside {source.weights}; pass --config.tokenizer=DIR (the one the "
                             "DIFT run used).")
        changes["tokenizer"] = source.tokenizer
    if not data and not settings.data.path:
        changes["data.path"] = trained_on(source)
    return job.run(settings.replace(**changes), workdir, make_rl_trainer, data=data, steps=steps, progress=progress)
