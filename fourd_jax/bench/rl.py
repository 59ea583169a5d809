"""`fourd-jax bench rl`: seconds per GRPO step in JAX vs the same step in PyTorch, same machine.

One step, on both sides: G samples per prompt (temperature 1.0, top-p 0.9, image/video
placeholders never sampled, no EOS so every row has `max_new_tokens` tokens), a host reward,
group-normalised advantages, reference log-probs from a frozen copy of the initial weights, and
one update of the clipped-ratio loss + 0.01 * k1 KL (masked per-sequence mean), clipped AdamW
with the vision tower frozen. JAX: the jitted sampler, a jitted reference scoring forward and the
jitted `update_step` of `fourd_jax.train.rl`; PyTorch: `transformers` `generate(do_sample=True,
num_return_sequences=G)`, a forward over prompt + completion for the per-token log-probs (policy
and reference), the same loss written in torch, `torch.optim.AdamW`.

The prompts are the `bench sample` ones (text + an 8-frame 112 px video) with the same weights.
The bench has no tokenizer, so the reward is a deterministic function of the token ids (the
fraction of even ids) instead of `fourdthinker_reward` on decoded text; it costs microseconds on
either side, as the real rule-based reward does. Before timing, PyTorch's log-probs of a JAX
rollout are checked against the log-probs the JAX sampler reported for it.
"""

from __future__ import annotations

import copy
import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fourd_jax.bench import roofline
from fourd_jax.bench.forward import latent_bench_config
from fourd_jax.bench.report import record as record_row
from fourd_jax.bench.sample import bench_prompts, reference_models
from fourd_jax.data.batching import media_arrays
from fourd_jax.model.inputs import vision_inputs
from fourd_jax.sample import SamplingConfig, generate, prepare_prompt
from fourd_jax.train.observe import decoder_flops_per_token, vision_flops_per_patch
from fourd_jax.train.optim import make_optimizer, trainable_mask
from fourd_jax.train.rl import completion_logprobs, frozen_vision_features, group_advantages, update_step
from fourd_jax.train.settings import GrpoConfig, OptimSettings
from fourd_jax.train.state import new_state

FREEZE = (r"^visual/",)


def token_reward(tokens: np.ndarray) -> np.ndarray:
    """Per-row reward from token ids alone: the fraction of even ids (a stand-in for a rule-based
    reward on decoded text; deterministic, with a spread inside every group)."""
    return (np.asarray(tokens) % 2 == 0).mean(axis=1).astype(np.float32)


def jax_prompt(model: Any, batch: dict[str, np.ndarray]) -> Any:
    """The prompts as the RL trainer feeds them: host positions, and each row's video laid out
    per example (what `scoring_inputs` repeats G times) rather than flat."""
    flat = prepare_prompt(model, **batch)
    grids = batch["video_grid_thw"]
    patches = np.split(batch["pixel_values_videos"], np.cumsum(np.prod(grids, axis=1))[:-1])
    arrays = media_arrays(patches, [g[None] for g in grids], len(grids), model.config, "video")
    arrays = {k: v if k.endswith("frame_len") else jnp.asarray(v) for k, v in arrays.items()}
    return flat.replace(vision=vision_inputs(arrays, "video"))


def grpo_step_flops(config: Any, prompts: int, prompt_len: int, patches: int, group: int, new_tokens: int) -> float:
    """Model FLOPs of one GRPO step, each piece of work counted once: the rollout (prompt prefill and
    G x n decoded tokens, forward), the reference scoring (forward) and the update (forward +
    backward) of the prompt and its G completions, and the frozen vision tower's forward once (its
    tokens serve all three)."""
    seq = prompt_len + new_tokens
    tokens = prompts * (prompt_len + group * new_tokens)
    forward = tokens * decoder_flops_per_token(config, seq, trainable=False)
    backward = tokens * decoder_flops_per_token(config, seq) - forward
    return 3 * forward + backward + patches * vision_flops_per_patch(config)


def torch_grpo(torch_model: Any, batch: dict[str, np.ndarray], config: Any, group: int, max_new_tokens: int,
               lr: float, epsilon: float, beta: float):
    """A PyTorch GRPO step on `torch_model` (updated in place); returns (step callable, log-prob
    function of the policy on given completions [B * G, N] for the agreement check)."""
    import torch  # the baseline; heavy, and only the torch side needs it

    reference = copy.deepcopy(torch_model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    policy = torch_model
    for p in policy.model.visual.parameters():
        p.requires_grad_(False)
    trainable = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for _, p in trainable if p.ndim >= 2], "weight_decay": 0.01},
                             {"params": [p for _, p in trainable if p.ndim < 2], "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.999), eps=1e-8)
    prompt = {k: torch.tensor(v) for k, v in batch.items()}
    n = max_new_tokens
    # Every prompt repeated G times (prompt-major), media included, for the scoring forward.
    counts = [int(np.prod(g)) for g in batch["video_grid_thw"]]
    videos = torch.split(prompt["pixel_values_videos"], counts)
    repeated = dict(
        attention_mask=prompt["attention_mask"].repeat_interleave(group, 0),
        pixel_values_videos=torch.cat([v for v in videos for _ in range(group)]),
        video_grid_thw=prompt["video_grid_thw"].repeat_interleave(group, 0),
        second_per_grid_ts=prompt["second_per_grid_ts"].repeat_interleave(group, 0),
    )

    def scoring(sequences: torch.Tensor) -> dict[str, torch.Tensor]:
        ones = torch.ones((sequences.shape[0], n), dtype=repeated["attention_mask"].dtype)
        return dict(repeated, input_ids=sequences, attention_mask=torch.cat([repeated["attention_mask"], ones], 1),
                    mm_token_type_ids=(sequences == config.video_token_id).long() * 2)

    def logprobs(model: Any, sequences: torch.Tensor) -> torch.Tensor:
        # Logits of the last n + 1 positions only: position t predicts token t + 1 (temperature 1).
        logits = model(**scoring(sequences), logits_to_keep=n + 1).logits[:, :-1].float()
        return torch.log_softmax(logits, -1).gather(-1, sequences[:, -n:, None])[..., 0]

    def step() -> float:
        with torch.no_grad():
            sequences = policy.generate(
                **prompt, do_sample=True, temperature=1.0, top_p=0.9, top_k=0, num_return_sequences=group,
                max_new_tokens=n, min_new_tokens=n, suppress_tokens=[config.image_token_id, config.video_token_id])
            completion = sequences[:, -n:]
            adv = torch.tensor(group_advantages(token_reward(completion.numpy()), group))[:, None]
            ref = logprobs(reference, sequences)
        logp = logprobs(policy, sequences)
        ratio = torch.exp(logp - logp.detach())  # one iteration: the sampling policy is the current one
        surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - epsilon, 1 + epsilon) * adv)
        per_token = -surrogate + beta * (logp - ref)  # k1 KL estimate
        mask = torch.ones_like(logp)  # no EOS: every completion token counts
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in trainable], 1.0)
        opt.step()
        return float(loss.detach())

    def policy_logprobs(completions: np.ndarray) -> np.ndarray:
        sequences = torch.cat([prompt["input_ids"].repeat_interleave(group, 0), torch.tensor(completions).long()], 1)
        with torch.no_grad():
            return logprobs(policy, sequences).numpy()

    return step, policy_logprobs


class JaxPrograms(NamedTuple):
    """The jitted pieces of the bench's JAX GRPO step, as `fourd-jax rl` runs them."""

    tx: optax.GradientTransformation
    sampling: SamplingConfig
    update: Any  # (state, prompt, rollout, advantages, ref, features) -> (state, metrics), state donated
    score: Any  # (params, prompt, rollout, features) -> log-probs of the completions
    tower: Any  # (params, prompt) -> the frozen tower's tokens, once per step for all three


def jax_programs(model: Any, params: Any, group: int, max_new_tokens: int, lr: float,
                 grpo: GrpoConfig) -> JaxPrograms:
    """The optimizer, sampler settings and jitted programs of one JAX GRPO step (vision tower frozen)."""
    tx = make_optimizer(OptimSettings(lr=lr, total_steps=10, freeze=FREEZE), params)
    trainable = trainable_mask(params, FREEZE)
    # The sampler of `fourd-jax rl`, imagery rule included: a row that samples <|latent_start|> gets
    # forced pads fed with hidden states. It rarely fires with random weights, and the tokens per
    # step are max_new_tokens either way, so torch (which has no such rule) does the same work.
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0, top_p=0.9,
                              pad_token_id=model.config.pad_token_id, imagery=True, latent_size=4)
    update = jax.jit(functools.partial(update_step, model=model, tx=tx, trainable=trainable, config=grpo),
                     donate_argnums=0)
    score = jax.jit(lambda p, prompt, rollout, features: completion_logprobs(p, model, prompt, rollout, group,
                                                                             grpo.temperature, features))
    tower = jax.jit(lambda p, prompt: frozen_vision_features(p, trainable, model, prompt))
    return JaxPrograms(tx, sampling, update, score, tower)


def run(size: str = "small", repeats: int = 5, record: bool = True, group: int = 4,
        max_new_tokens: int = 64) -> dict[str, Any]:
    """Time both GRPO steps; print and (optionally) record the ratio."""
    import torch  # the baseline; heavy, and only the torch side needs it

    # The 4DThinker vocabulary: latent tokens (as in `bench train`), which the RL code expects.
    config = latent_bench_config(size)
    torch_model, model, params = reference_models(config)
    batch = bench_prompts(config, lengths=(24, 40), video_rows=(0, 1))
    prompt = jax_prompt(model, batch)
    n, lr = max_new_tokens, 1e-4
    grpo = GrpoConfig(num_generations=group, temperature=1.0)  # epsilon 0.2, beta 0.01, k1, sequence-mean
    torch_step, torch_logprobs = torch_grpo(torch_model, batch, config, group, n, lr, grpo.epsilon, grpo.beta)

    tx, sampling, update, score, tower = jax_programs(model, params, group, n, lr, grpo)
    reference = jax.tree_util.tree_map(jnp.copy, params)  # own buffers: the state's are donated
    state = new_state(params, tx, 0)
    key, steps = jax.random.key(0), 0

    def jax_step() -> float:
        nonlocal state, steps
        features = tower(state.params, prompt)
        rollout = generate(state.params, prompt, jax.random.fold_in(key, steps), model=model, config=sampling,
                           num_samples=group, vision_features=features)
        advantages = group_advantages(token_reward(np.asarray(rollout.tokens)), group)
        ref = score(reference, prompt, rollout, features)
        state, metrics = update(state, prompt, rollout, jnp.asarray(advantages), ref, features)
        steps += 1
        return float(metrics["loss"])  # blocks until the update is done

    # Agreement first, on a JAX rollout of the initial weights: torch's per-token log-probs of the
    # same sequences must equal what the JAX sampler reported (same model, positions and media),
    # up to a row's first latent token (after it JAX feeds hidden states, torch token embeddings).
    start = time.perf_counter()
    rollout = generate(params, prompt, jax.random.key(1), model=model, config=sampling, num_samples=group)
    ours, tokens = np.asarray(rollout.logprobs), np.asarray(rollout.tokens)
    compile_s = time.perf_counter() - start
    before_latent = np.cumsum(np.isin(tokens, config.latent_token_ids), axis=1) == 0
    max_diff = float(np.abs(torch_logprobs(tokens) - ours)[before_latent].max())
    if max_diff > 1e-3:
        raise RuntimeError(f"JAX and PyTorch log-probs of the same rollout disagree (max |diff| {max_diff:.2e}); "
                           "not timing.")

    start = time.perf_counter()
    jax_step()  # compiles the tower, the scoring forward and the update
    compile_s += time.perf_counter() - start
    torch_step()  # warm-up
    jax_runs, torch_runs = roofline.time_runs(jax_step, repeats), roofline.time_runs(torch_step, repeats)
    jax_s, torch_s = jax_runs.median, torch_runs.median
    prompts, prompt_len = batch["input_ids"].shape
    rows = group * prompts
    flops = grpo_step_flops(config, prompts, prompt_len, batch["pixel_values_videos"].shape[0], group, n)
    roof, roof_line = roofline.compute_roof(
        flops, jax_runs, torch_runs, (rows * n, config.text.hidden_size, config.text.intermediate_size),
        "step (rollout, reference scoring and update; each prompt's work counted once)")
    result = {
        "size": size, "prompts x G": f"{prompts}x{group}", "prompt tokens": int(prompt_len), "new tokens": n,
        "jax s/step": round(jax_s, 2), "jax spread s": f"{jax_runs.low:.2f}-{jax_runs.high:.2f}",
        "torch s/step": round(torch_s, 2), "torch spread s": f"{torch_runs.low:.2f}-{torch_runs.high:.2f}",
        "speed-up (torch / jax)": round(torch_s / jax_s, 2), **roof, "jax compile s": round(compile_s, 1),
        "max logprob diff": f"{max_diff:.1e}", "reward": "even-id fraction", "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    print(f"GRPO step ({size}, {result['prompts x G']} = {rows} rollouts of {n} new tokens after prompts of up to "
          f"{result['prompt tokens']} tokens with an 8-frame video, fp32): jax {result['jax s/step']} s "
          f"({result['jax spread s']}), torch {result['torch s/step']} s ({result['torch spread s']}) -> jax is "
          f"{result['speed-up (torch / jax)']}x the speed of torch (median (spread) of {repeats}; jax compile + first "
          f"runs {compile_s:.1f} s; log-probs of one rollout agree to {max_diff:.1e})")
    print(roof_line)
    print("reward: the fraction of even token ids per completion (no tokenizer in this bench, so not "
          "fourdthinker_reward on decoded text)")
    if record:
        path = record_row(
            "rl",
            "`fourd-jax bench rl`: seconds per GRPO step (G samples per prompt at temperature 1.0 / top-p 0.9, no "
            "EOS; host reward = fraction of even token ids, as the bench has no tokenizer; group advantages; "
            "reference log-probs from a frozen copy; clipped ratio + 0.01 * k1 KL, per-sequence mean; clipped AdamW, "
            "vision tower frozen) in JAX (jitted `generate` + reference scoring + `update_step`) vs `transformers` "
            "`generate(do_sample=True, num_return_sequences=G)` + a torch forward/backward of the same loss + "
            "`torch.optim.AdamW`, same weights, prompts (text + an 8-frame 112 px video) and machine, fp32, median "
            "wall time.",
            result,
        )
        print(f"recorded in {path}")
    return result
