"""Where the sampler's time goes on this machine (docs/PERFORMANCE.md, "Sampler profile").

    .venv/bin/python docs/sampler_profile.py

1. Prefill vs decode: the bench-sample prompts decoded for n and 3n new tokens; the difference
   gives the cost of one decode step, the rest is the prefill (and the vision tower).
2. One decode step against its floor: every decoder weight read once at the bandwidth of a
   weight-sized small-batch matmul, measured now.
3. Imagery: the decode loop runs one program per position whether it writes a text token or a
   latent pad (a pad selects the fed hidden state instead of the embedding), so a latent position
   costs what any position of a decode with the imagery rule on costs; that decode is timed
   against the same decode with the rule off (text only).
4. bf16: the weight-streaming matmul in float32 and in bfloat16 (half the bytes), to see whether
   XLA:CPU's bf16 dot keeps the gain.
5. The fixed cost of a call (what is not n x the step) itemised: the prefill alone, the split of the
   stacked decoder weights alone, and a call that decodes one token, each its own jitted program.
Each figure is the median of 7 runs, with the spread.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fourd_jax.bench import roofline  # noqa: E402
from fourd_jax.bench.forward import latent_bench_config  # noqa: E402
from fourd_jax.bench.sample import bench_prompts, reference_models  # noqa: E402
from fourd_jax.model.text import unstack_layers  # noqa: E402
from fourd_jax.sample import SamplingConfig, generate, prefill, prepare_prompt  # noqa: E402


def decode_runs(params, prompt, model, n: int, **sampling) -> roofline.Runs:
    config = SamplingConfig(max_new_tokens=n, pad_token_id=model.config.pad_token_id, block_media_tokens=False,
                            **sampling)
    run = lambda: np.asarray(generate(params, prompt, jax.random.key(0), model=model, config=config).tokens)  # noqa: E731
    run()
    return roofline.time_runs(run, 7)


def main(rows: int = 4, n: int = 32) -> None:
    config = latent_bench_config("small")
    _, model, params = reference_models(config)
    batch = bench_prompts(config, lengths=(24, 40, 16, 32) * (rows // 4), video_rows=range(0, rows, 2))
    prompt = prepare_prompt(model, **batch)
    short, long = decode_runs(params, prompt, model, n, imagery=False), decode_runs(params, prompt, model, 3 * n,
                                                                                     imagery=False)
    step = (long.median - short.median) / (2 * n)
    prefill = short.median - n * step
    weights = roofline.decoder_weight_bytes(params)
    bandwidth, bw_runs = roofline.stream_bandwidth(weights, rows, config.text.hidden_size)
    floor = weights / bandwidth
    print(f"{rows} rows: {n} new tokens {short.ms()}, {3 * n} new tokens {long.ms()}")
    print(f"  one decode step {step * 1e3:.2f} ms; prefill (prompt + video) {prefill * 1e3:.1f} ms")
    print(f"  floor of a step: {weights / 1e6:.1f} MB of decoder weights at {bandwidth / 1e9:.1f} GB/s "
          f"({bw_runs.ms()} per read) = {floor * 1e3:.2f} ms; the step is at {floor / step:.0%} of it")
    fixed_cost(params, prompt, model, n, prefill_estimate=prefill)
    imagery = decode_runs(params, prompt, model, 3 * n, imagery=True, latent_size=4)
    print(f"  imagery rule on: {3 * n} new tokens {imagery.ms()} vs {long.ms()} text only "
          f"({imagery.median / long.median:.2f}x)")
    for dtype in (jnp.float32, jnp.bfloat16):
        rate, runs = roofline.stream_bandwidth(weights // (4 // jnp.dtype(dtype).itemsize), rows,
                                               config.text.hidden_size, dtype=dtype)
        print(f"  weight-streaming matmul in {jnp.dtype(dtype).name}: {runs.ms()}, {rate / 1e9:.1f} GB/s "
              f"(the same {weights // 4 / 1e6:.1f} M weights)")


def fixed_cost(params, prompt, model, n: int, prefill_estimate: float) -> None:
    """Section 5: the parts of a call that do not grow with the tokens, each timed alone."""
    run_prefill = jax.jit(lambda p, x: prefill(p, x, model, n, 1))
    split = jax.jit(lambda p: unstack_layers(p["language_model"]))
    parts = {"prefill alone (prompt + video, cache for n new)": lambda: jax.block_until_ready(
                 run_prefill(params, prompt)),
             "split of the stacked decoder weights alone": lambda: jax.block_until_ready(split(params))}
    for name, fn in parts.items():
        fn()
        print(f"  {name}: {roofline.time_runs(fn, 7).ms()}")
    print(f"  a call that decodes 1 token: {decode_runs(params, prompt, model, 1, imagery=False).ms()}; "
          f"fixed cost from the two decode lengths: {prefill_estimate * 1e3:.1f} ms")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
