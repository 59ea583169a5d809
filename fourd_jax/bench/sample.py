"""`fourd-jax bench sample`: greedy new tokens/s of the jitted JAX sampler vs `transformers` generate.

Both frameworks continue the same left-padded prompts (4 rows of text, two of them with an
8-frame 112 px video, or those four repeated to `rows`, as an RL batch of prompts x G) with the
same Qwen2.5-VL weights (written once by `transformers`, read by `fourd_jax.hf.load`), greedily,
for exactly `max_new_tokens` tokens: neither side has an EOS token, so no row stops early. JAX:
one compiled program (prefill + `lax.while_loop` over a preallocated KV cache); PyTorch:
`generate(do_sample=False)` with its dynamic cache, eager. The tokens are compared (rows that
agree are counted; a near-tie may flip one token in fp32).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from fourd_jax.bench import roofline
from fourd_jax.bench.forward import bench_config
from fourd_jax.bench.report import record as record_row
from fourd_jax.convert import hf
from fourd_jax.data.processor import patchify
from fourd_jax.model.config import ModelConfig
from fourd_jax.model.vlm import Qwen25VL
from fourd_jax.sample import SamplingConfig, generate, prepare_prompt
from fourd_jax.train.observe import decoder_flops_per_token


def reference_models(config: ModelConfig) -> tuple[Any, Any, Any]:
    """(`transformers` model, JAX model, JAX params) with the same random weights.

    The weights are made by `transformers` (seed 0) and read back through the repo's converter.
    The JAX model positions text after a video as transformers 5.x does ("spatial_extent"), so
    both frameworks see the same M-RoPE positions.
    """
    # The baseline; heavy, and only the torch side needs it.
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    torch_model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(hf.config_to_hf(config))).eval()
    with tempfile.TemporaryDirectory() as tmp:
        torch_model.save_pretrained(tmp)
        model, params = hf.load(tmp)
    # No EOS in transformers' generation config: every row runs to max_new_tokens, as in ours.
    torch_model.generation_config.eos_token_id = None
    torch_model.generation_config.pad_token_id = config.pad_token_id
    return torch_model, Qwen25VL(model.config.replace(mrope_text_start="spatial_extent")), params


def bench_prompts(config: ModelConfig, lengths: Sequence[int], video_rows: Sequence[int], frames: int = 8,
                  image: int = 112, seed: int = 0) -> dict[str, np.ndarray]:
    """Left-padded processor outputs: row i is `lengths[i]` text tokens, then (for i in
    `video_rows`) a `frames`-frame video of `image` px and 8 more text tokens."""
    rs = np.random.RandomState(seed)
    m2 = config.vision.spatial_merge_size**2
    # Ordinary tokens only: below the special ids (incl. the latent ones `bench rl` adds).
    text = lambda n: rs.randint(0, config.vision_start_token_id - 16, n).tolist()  # noqa: E731
    rows, patches, grids = [], [], []
    for i, n in enumerate(lengths):
        ids = text(n)
        if i in video_rows:
            p, g = patchify(rs.randint(0, 256, (frames, image, image, 3), dtype=np.uint8), config.vision)
            patches.append(p)
            grids.append(g)
            ids += ([config.vision_start_token_id] + [config.video_token_id] * (int(np.prod(g)) // m2)
                    + [config.vision_end_token_id] + text(8))
        rows.append(ids)
    width = max(len(r) for r in rows)
    input_ids = np.full((len(rows), width), config.pad_token_id, np.int64)
    mask = np.zeros_like(input_ids)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    batch = dict(input_ids=input_ids, attention_mask=mask,
                 mm_token_type_ids=np.where(input_ids == config.video_token_id, 2, 0))
    if patches:
        batch.update(pixel_values_videos=np.concatenate(patches), video_grid_thw=np.array(grids),
                     second_per_grid_ts=np.full(len(grids), 2.0, np.float32))
    return batch


def run(size: str = "small", repeats: int = 5, record: bool = True, max_new_tokens: int = 64,
        rows: int = 4) -> dict[str, Any]:
    """Time greedy generation of `rows` prompts (a multiple of 4: the bench's four prompts
    repeated, e.g. 32 for an RL batch of prompts x G) in both frameworks; print and (optionally)
    record the ratio and the fraction of this machine's roof."""
    import torch  # the baseline; heavy, and only the torch side needs it

    config = bench_config(size)
    torch_model, model, params = reference_models(config)
    if rows < 4 or rows % 4:
        raise ValueError(f"rows must be a positive multiple of 4, not {rows}")
    batch = bench_prompts(config, lengths=(24, 40, 16, 32) * (rows // 4), video_rows=range(0, rows, 2))
    torch_batch = {k: torch.tensor(v) for k, v in batch.items()}
    prompt = prepare_prompt(model, **batch)
    n = max_new_tokens
    # Unconstrained greedy decoding, like generate(do_sample=False): no EOS, no imagery, no token masks.
    sampling = SamplingConfig(max_new_tokens=n, pad_token_id=config.pad_token_id, imagery=False,
                              block_media_tokens=False)
    key = jax.random.key(0)

    def jax_generate() -> np.ndarray:
        return np.asarray(generate(params, prompt, key, model=model, config=sampling).tokens)

    def torch_generate() -> np.ndarray:
        with torch.no_grad():
            out = torch_model.generate(**torch_batch, do_sample=False, max_new_tokens=n, min_new_tokens=n)
        return out[:, batch["input_ids"].shape[1]:].numpy()

    start = time.perf_counter()
    ours = jax_generate()  # compile + one run
    compile_s = time.perf_counter() - start
    ref = torch_generate()  # warm-up (and the reference tokens)
    if ours.shape != ref.shape:
        raise RuntimeError(f"JAX generated {ours.shape} tokens, PyTorch {ref.shape}; not timing.")
    equal_rows = int(np.all(ours == ref, axis=1).sum())
    equal_tokens = float(np.mean(ours == ref))

    jax_runs = roofline.time_runs(jax_generate, repeats)  # np.asarray blocks until the tokens exist
    torch_runs = roofline.time_runs(torch_generate, repeats)
    peak_rss = roofline.peak_rss_bytes()
    jax_s, torch_s = jax_runs.median, torch_runs.median
    # The roof of decoding: each of the n steps reads every decoder weight once (bandwidth) and
    # does `rows` tokens of matmuls (compute); the slower of the two bounds the step. The prefill
    # and the KV cache reads come on top, so the fraction is a lower bound.
    weights = roofline.decoder_weight_bytes(params)
    bandwidth, _ = roofline.stream_bandwidth(weights, rows, config.text.hidden_size)
    peak, _ = roofline.matmul_peak(rows, config.text.hidden_size, config.text.intermediate_size)
    per_token = decoder_flops_per_token(config, batch["input_ids"].shape[1] + n, trainable=False)
    bound_s = max(n * weights / bandwidth, n * rows * per_token / peak)
    bound = "weights" if n * weights / bandwidth >= n * rows * per_token / peak else "compute"
    new = ours.size
    result = {
        "size": size, "rows": rows, "prompt tokens": int(batch["input_ids"].shape[1]), "new tokens": n,
        "jax tok/s": round(new / jax_s, 1), "jax spread tok/s": f"{new / jax_runs.high:.0f}-{new / jax_runs.low:.0f}",
        "torch tok/s": round(new / torch_s, 1),
        "torch spread tok/s": f"{new / torch_runs.high:.0f}-{new / torch_runs.low:.0f}",
        "speed-up (torch / jax)": round(torch_s / jax_s, 2), "decoder MB": round(weights / 1e6, 1),
        "stream GB/s": round(bandwidth / 1e9, 1), "matmul peak GFLOP/s": round(peak / 1e9, 1), "bound": bound,
        "jax of bound": roofline.fraction(bound_s, jax_s),
        "torch of bound": roofline.fraction(bound_s, torch_s), "peak RSS GiB": round(peak_rss / 2**30, 2),
        "jax compile s": round(compile_s, 1), "equal rows": f"{equal_rows}/{rows}", "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    print(f"greedy sampling ({size}, {rows} left-padded prompts of up to {result['prompt tokens']} tokens, "
          f"half with an 8-frame video, {n} new tokens each, fp32): jax {result['jax tok/s']} tok/s "
          f"({jax_runs.ms()}), torch generate {result['torch tok/s']} tok/s ({torch_runs.ms()}) -> jax is "
          f"{result['speed-up (torch / jax)']}x the speed of torch (median (spread) of {repeats}; jax compile + "
          f"first run {compile_s:.1f} s)")
    print(f"roofline: {n} steps, each reading {weights / 1e6:.1f} MB of decoder weights at {bandwidth / 1e9:.1f} GB/s "
          f"and doing {rows} tokens x {per_token / 1e6:.0f} MFLOP at {peak / 1e9:.0f} GFLOP/s (a jitted {rows}-row "
          f"matmul, measured now for each): {bound_s * 1e3:.0f} ms at best, bound by {bound}; jax reaches "
          f"{result['jax of bound']} and torch {result['torch of bound']} of that bound; peak host memory "
          f"{result['peak RSS GiB']} GiB")
    print(f"greedy tokens: {equal_rows}/{ours.shape[0]} rows identical, {equal_tokens:.1%} of tokens equal"
          + ("" if equal_rows == ours.shape[0] else " (a near-tie flips a token, and the rows diverge after it)"))
    if record:
        path = record_row(
            "sample",
            "`fourd-jax bench sample`: greedy new tokens/s of the jitted JAX sampler (`fourd_jax.sample.generate`: "
            "one compiled prefill + `lax.while_loop` over a preallocated KV cache) vs `transformers` "
            "`generate(do_sample=False)` (eager, `torch.no_grad`), same weights, same left-padded prompts (`rows`: "
            "4, or 4 repeated; half with an 8-frame 112 px video), no EOS so every row generates all new tokens, "
            "fp32, median wall time. `equal rows`: rows whose tokens are identical in both.",
            result,
        )
        print(f"recorded in {path}")
    return result
