"""Where the GRPO step's time goes, in JAX and in PyTorch (docs/PERFORMANCE.md, "GRPO step profile").

    .venv/bin/python docs/grpo_profile.py

`bench rl` times whole steps. This script times the three parts of the same step on the same
weights and prompts (2 prompts with an 8-frame video, G = 4, 64 new tokens), each side on its own:

1. the rollout: JAX `generate` (top-p 0.9, the imagery rule on) vs `transformers`
   `generate(do_sample=True, num_return_sequences=G)`;
2. one scoring forward of the G x 2 sequences (the reference's log-probs): JAX
   `completion_logprobs` (each prompt once, its completions on its KV cache) vs a torch forward
   over prompt + completion with `logits_to_keep`;
3. the update: JAX `update_step` (forward + backward + AdamW) timed alone; torch's by difference
   (its whole step minus parts 1 and 2, as the bench's torch step runs them in one function).

JAX runs the frozen vision tower once per step, and the three parts take its tokens (as
`fourd-jax rl` does); torch runs it in each part. Each part's FLOPs (`bench rl`'s count, split, the
tower counted once) are set against the matmul peak measured now, and each figure is the median of
5 runs with the spread.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fourd_jax.bench import roofline  # noqa: E402
from fourd_jax.bench.forward import latent_bench_config  # noqa: E402
from fourd_jax.bench.rl import jax_programs, jax_prompt, token_reward, torch_grpo  # noqa: E402
from fourd_jax.bench.sample import bench_prompts, reference_models  # noqa: E402
from fourd_jax.sample import generate  # noqa: E402
from fourd_jax.train.observe import decoder_flops_per_token, vision_flops_per_patch  # noqa: E402
from fourd_jax.train.rl import group_advantages  # noqa: E402
from fourd_jax.train.settings import GrpoConfig  # noqa: E402
from fourd_jax.train.state import new_state  # noqa: E402

REPEATS, GROUP, NEW = 5, 4, 64


def main() -> None:
    import torch

    config = latent_bench_config("small")
    torch_model, model, params = reference_models(config)
    batch = bench_prompts(config, lengths=(24, 40), video_rows=(0, 1))
    prompt = jax_prompt(model, batch)
    grpo = GrpoConfig(num_generations=GROUP, temperature=1.0)
    torch_step, torch_logprobs = torch_grpo(torch_model, batch, config, GROUP, NEW, 1e-4, grpo.epsilon, grpo.beta)
    tx, sampling, update, score, tower = jax_programs(model, params, GROUP, NEW, 1e-4, grpo)
    features = tower(params, prompt)
    reference = jax.tree_util.tree_map(jnp.copy, params)
    holder = {"state": new_state(jax.tree_util.tree_map(jnp.copy, params), tx, 0)}
    rollout = generate(params, prompt, jax.random.key(0), model=model, config=sampling, num_samples=GROUP,
                       vision_features=features)
    advantages = jnp.asarray(group_advantages(token_reward(np.asarray(rollout.tokens)), GROUP))
    ref = score(reference, prompt, rollout, features)

    def jax_rollout():
        return np.asarray(generate(params, prompt, jax.random.key(0), model=model, config=sampling,
                                   num_samples=GROUP, vision_features=features).tokens)

    def jax_update():
        holder["state"], metrics = update(holder["state"], prompt, rollout, advantages, ref, features)
        return float(metrics["loss"])

    torch_prompt = {k: torch.tensor(val) for k, val in batch.items()}

    def torch_rollout():
        with torch.no_grad():
            return torch_model.generate(**torch_prompt, do_sample=True, temperature=1.0, top_p=0.9, top_k=0,
                                        num_return_sequences=GROUP, max_new_tokens=NEW, min_new_tokens=NEW,
                                        suppress_tokens=[config.image_token_id, config.video_token_id])

    completions = np.asarray(rollout.tokens)
    parts = {
        "rollout": (jax_rollout, torch_rollout),
        "frozen tower (once per step)": (lambda: jax.block_until_ready(tower(params, prompt)), None),
        "scoring forward": (lambda: jax.block_until_ready(score(reference, prompt, rollout, features)),
                            lambda: torch_logprobs(completions)),
        "update": (jax_update, None),
        "whole step": (None, torch_step),
    }
    times = {}
    for name, (ours, theirs) in parts.items():
        for side, fn in (("jax", ours), ("torch", theirs)):
            if fn is not None:
                fn()
                times[name, side] = roofline.time_runs(fn, REPEATS)
    times["update", "torch"] = None

    prompts, prompt_len = batch["input_ids"].shape
    seq = prompt_len + NEW
    tokens = prompts * (prompt_len + GROUP * NEW)
    forward = tokens * decoder_flops_per_token(config, seq, trainable=False)
    vision = batch["pixel_values_videos"].shape[0] * vision_flops_per_patch(config)
    # Each part's necessary work: the decoder's, with the frozen tower's counted once, in its own part
    # (torch's parts each run the tower again: work beyond these counts).
    flops = {"rollout": forward, "scoring forward": forward, "update": tokens * decoder_flops_per_token(config, seq)}
    peak, _ = roofline.matmul_peak(GROUP * prompts * NEW, config.text.hidden_size, config.text.intermediate_size)
    torch_update = (times["whole step", "torch"].median - times["rollout", "torch"].median
                    - times["scoring forward", "torch"].median)
    print(f"GRPO step profile: small model, {prompts} prompts x G {GROUP}, {NEW} new tokens, prompts of "
          f"{prompt_len} tokens; matmul peak {peak / 1e9:.1f} GFLOP/s (a {GROUP * prompts * NEW}-row matmul, "
          "measured now)")
    print(f"  frozen tower, once per step (the rollout, the reference and the update share it): jax "
          f"{times['frozen tower (once per step)', 'jax'].ms()}, {vision / 1e9:.2f} GFLOP (torch runs it in each "
          "of its three parts)")
    for name in ("rollout", "scoring forward", "update"):
        jax_s = times[name, "jax"].median
        torch_s = torch_update if name == "update" else times[name, "torch"].median
        torch_text = (f"{torch_s * 1e3:.0f} ms (by difference)" if name == "update"
                      else times[name, "torch"].ms())
        print(f"  {name}: jax {times[name, 'jax'].ms()}, torch {torch_text} -> {torch_s / jax_s:.2f}x; "
              f"{flops[name] / 1e9:.2f} GFLOP, jax at {flops[name] / jax_s / peak:.0%} and torch at "
              f"{flops[name] / torch_s / peak:.0%} of the peak")
    jax_total = sum(times[name, "jax"].median
                    for name in ("frozen tower (once per step)", "rollout", "scoring forward", "update"))
    print(f"  jax parts sum to {jax_total * 1e3:.0f} ms; torch's whole step {times['whole step', 'torch'].ms()} "
          f"-> {times['whole step', 'torch'].median / jax_total:.2f}x")


if __name__ == "__main__":
    main()
