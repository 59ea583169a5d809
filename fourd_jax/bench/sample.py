"""`fourd-jax bench sample`: greedy new tokens/s of the jitted JAX sampler vs `transformers` generate.

Both frameworks continue the same left-padded prompts (4 rows of text, two of them with an
8-frame 112 px video) with the same Qwen2.5-VL weights (written once by `transformers`, read by
`fourd_jax.hf.load`), greedily, for exactly `max_new_tokens` tokens: neither side has an EOS token,
so no row stops early. `rows` > 4 is an RL rollout batch of 4 prompts x G = rows / 4 samples each,
as each framework runs one: JAX prefills each prompt once and decodes G rows from its cache
(`generate(num_samples=G)`, as `fourd-jax rl` does); `transformers` runs the prompts repeated G
times, which is what `generate(num_return_sequences=G)` does before its first forward (greedy
search refuses that argument, so the bench repeats them itself). JAX: one compiled program
(prefill + `lax.while_loop` over a preallocated KV cache); PyTorch: `generate(do_sample=False)`
with its dynamic cache, eager. The tokens are compared (rows that agree are counted; a near-tie
may flip one token in fp32).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from fourd_jax.bench import roofline
from fourd_jax.bench.forward import bench_config, forward_flops
from fourd_jax.bench.report import record as record_row
from fourd_jax.convert import hf
from fourd_jax.data.processor import patchify
from fourd_jax.model.config import ModelConfig
from fourd_jax.model.vlm import Qwen25VL
from fourd_jax.sample import SamplingConfig, generate, prepare_prompt


def reference_models(config: ModelConfig, dtype: str = "float32", device: Any = None) -> tuple[Any, Any, Any]:
    """(`transformers` model, JAX model, JAX params) with the same random weights, both in `dtype`,
    the torch model on `device` (default: the CPU).

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
        model, params = hf.load(tmp, dtype, attention_block=config.attention_block)
    torch_model = torch_model.to(device or torch.device("cpu"), getattr(torch, dtype))
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


def repeat_prompts(batch: dict[str, np.ndarray], times: int) -> dict[str, np.ndarray]:
    """Each prompt of a processor batch `times` times in a row (prompt-major), its video included:
    the batch `generate(num_return_sequences=times)` expands its inputs to."""
    out = {k: np.repeat(v, times, axis=0) for k, v in batch.items() if k != "pixel_values_videos"}
    if "pixel_values_videos" in batch:
        videos = np.split(batch["pixel_values_videos"], np.cumsum(np.prod(batch["video_grid_thw"], axis=1))[:-1])
        out["pixel_values_videos"] = np.concatenate([v for v in videos for _ in range(times)])
    return out


def run(size: str = "small", repeats: int = 5, record: bool = True, max_new_tokens: int = 64,
        rows: int = 4, dtype: str = "float32") -> dict[str, Any]:
    """Time greedy generation of `rows` rows (a multiple of 4: the bench's four prompts x G = rows / 4
    samples each, e.g. 32 for an RL rollout batch with G = 8) in both frameworks, weights in `dtype`,
    torch on the GPU when it sees one; print and (optionally) record the ratio and the fraction of
    this machine's roof."""
    import torch  # the baseline; heavy, and only the torch side needs it

    if rows < 4 or rows % 4:
        raise ValueError(f"rows must be a positive multiple of 4, not {rows}")
    roofline.checked_dtype(dtype)
    config = bench_config(size)
    device = roofline.torch_device()
    torch_model, model, params = reference_models(config, dtype, device)
    group = rows // 4
    batch = bench_prompts(config, lengths=(24, 40, 16, 32), video_rows=(0, 2))
    torch_batch = {k: torch.tensor(v).to(device) for k, v in repeat_prompts(batch, group).items()}
    if "pixel_values_videos" in torch_batch:
        torch_batch["pixel_values_videos"] = torch_batch["pixel_values_videos"].to(getattr(torch, dtype))
    prompt = prepare_prompt(model, **batch)
    n = max_new_tokens
    # Unconstrained greedy decoding, like generate(do_sample=False): no EOS, no imagery, no token masks.
    sampling = SamplingConfig(max_new_tokens=n, pad_token_id=config.pad_token_id, imagery=False,
                              block_media_tokens=False)
    key = jax.random.key(0)

    def jax_generate() -> np.ndarray:
        return np.asarray(generate(params, prompt, key, model=model, config=sampling, num_samples=group).tokens)

    def torch_generate() -> np.ndarray:
        with torch.no_grad():
            out = torch_model.generate(**torch_batch, do_sample=False, max_new_tokens=n, min_new_tokens=n)
        return out[:, batch["input_ids"].shape[1]:].cpu().numpy()  # waits for the device

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
    # The roof of a call: the prefill of the 4 prompts (their tokens and videos, once) at the matmul
    # peak at its size, then n steps, each at least one `rows`-row matmul over every decoder weight:
    # a jitted one as large as the decoder, measured now, which reads each weight once and does the
    # step's multiply-adds (whichever of the two limits it, it limits the step). The attention and the
    # KV cache reads come on top, so the fraction is a lower bound.
    weights = roofline.decoder_weight_bytes(params)
    bandwidth, _ = roofline.stream_bandwidth(weights, rows, config.text.hidden_size, dtype=dtype)
    prefill_peak, _ = roofline.matmul_peak(batch["input_ids"].size, config.text.hidden_size,
                                           config.text.intermediate_size, dtype=dtype)
    prefill_s = forward_flops(config, batch) / prefill_peak  # the prompts run once
    step_s = weights / bandwidth
    bound_s = prefill_s + n * step_s
    new = ours.size
    result = {
        "size": size, "dtype": dtype, "torch device": device.type, "rows": rows, "prompts x G": f"4x{group}",
        "prompt tokens": int(batch["input_ids"].shape[1]),
        "new tokens": n,
        "jax tok/s": round(new / jax_s, 1), "jax spread tok/s": f"{new / jax_runs.high:.0f}-{new / jax_runs.low:.0f}",
        "torch tok/s": round(new / torch_s, 1),
        "torch spread tok/s": f"{new / torch_runs.high:.0f}-{new / torch_runs.low:.0f}",
        "speed-up (torch / jax)": round(torch_s / jax_s, 2), "decoder MB": round(weights / 1e6, 1),
        "weight matmul GB/s": round(bandwidth / 1e9, 1), "step bound ms": round(step_s * 1e3, 2),
        "prefill peak GFLOP/s": round(prefill_peak / 1e9, 1), "prefill bound ms": round(prefill_s * 1e3, 1),
        "jax of bound": roofline.fraction(bound_s, jax_s),
        "torch of bound": roofline.fraction(bound_s, torch_s), "peak RSS GiB": round(peak_rss / 2**30, 2),
        "jax compile s": round(compile_s, 1), "equal rows": f"{equal_rows}/{rows}", "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    print(f"greedy sampling ({size}, 4 left-padded prompts x G {group} = {rows} rows, prompts of up to "
          f"{result['prompt tokens']} tokens, half with an 8-frame video, {n} new tokens each, {dtype}, torch on "
          f"{device.type}): "
          f"jax {result['jax tok/s']} tok/s "
          f"({jax_runs.ms()}), torch generate {result['torch tok/s']} tok/s ({torch_runs.ms()}) -> jax is "
          f"{result['speed-up (torch / jax)']}x the speed of torch (median (spread) of {repeats}; jax compile + "
          f"first run {compile_s:.1f} s)")
    print(f"roofline: the prefill of the 4 prompts at the matmul peak at its size ({prefill_peak / 1e9:.0f} "
          f"GFLOP/s), {prefill_s * 1e3:.0f} ms, then {n} steps of at least a {rows}-row matmul over the "
          f"{weights / 1e6:.1f} MB of decoder weights ({step_s * 1e3:.2f} ms, {bandwidth / 1e9:.1f} GB/s, measured "
          f"now): {bound_s * 1e3:.0f} ms at best; jax reaches {result['jax of bound']} and torch "
          f"{result['torch of bound']} of that bound; peak host memory {result['peak RSS GiB']} GiB")
    print(f"greedy tokens: {equal_rows}/{ours.shape[0]} rows identical, {equal_tokens:.1%} of tokens equal"
          + ("" if equal_rows == ours.shape[0] else " (a near-tie flips a token, and the rows diverge after it)"))
    if record:
        path = record_row(
            "sample",
            "`fourd-jax bench sample`: greedy new tokens/s of the jitted JAX sampler (`fourd_jax.sample.generate`: "
            "one compiled prefill + `lax.while_loop` over a preallocated KV cache) vs `transformers` "
            "`generate(do_sample=False)` (eager, `torch.no_grad`), same weights, same 4 left-padded prompts (half "
            "with an 8-frame 112 px video) x G samples each (`rows` = 4 G: JAX prefills each prompt once and decodes "
            "its G rows from the cache, transformers runs the prompts repeated G times, as "
            "`num_return_sequences` does), no EOS so every row generates all new tokens, weights in `dtype`, "
            "median wall time. "
            "`equal rows`: rows whose tokens are identical in both.",
            result,
        )
        print(f"recorded in {path}")
    return result
