"""The benches' roofline arithmetic: work counts checked against XLA's own count and against the
arrays, and a bench run that reports them (numbers, never timings)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fourd_jax.bench import roofline
from fourd_jax.bench.forward import bench_config, forward_flops, latent_bench_config
from fourd_jax.errors import InputError
from fourd_jax.model.apply import abstract_params
from fourd_jax.model.vlm import Qwen25VL
from fourd_jax.train.observe import decoder_flops_per_token


def one_layer(tied: bool = False):
    # Dense attention: XLA's cost analysis counts a loop's body once, the tiles of blockwise attention too.
    c = bench_config("tiny")
    return c.replace(text=dataclasses.replace(c.text, num_layers=1), tie_word_embeddings=tied, attention_block=0)


def xla_flops(fn, *args) -> float:
    return float(jax.jit(fn).lower(*args).compile().cost_analysis()["flops"])


@pytest.mark.parametrize("trainable", [False, True])
def test_decoder_flops_agree_with_xla_cost_analysis(trainable):
    """One decoder layer (XLA counts a scanned layer once, so one layer is all of it) and the LM
    head, text only: the model-shape count is within 10% of XLA's (which adds norms, softmax and
    the elementwise work the count leaves out)."""
    config = one_layer()
    model = Qwen25VL(config)
    params = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), abstract_params(model))
    rows, length = 2, 256
    ids = jnp.zeros((rows, length), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(length), (3, rows, length))

    def forward(p, ids):
        return jnp.sum(model.apply({"params": p}, ids, position_ids=positions).logits ** 2)  # a dense gradient

    fn = jax.grad(forward) if trainable else forward
    counted = rows * length * decoder_flops_per_token(config, length, trainable=trainable)
    measured = xla_flops(fn, params, ids)
    assert abs(measured / counted - 1) < 0.1, (measured, counted)


@pytest.mark.parametrize("tied", [False, True])
def test_decoder_weight_bytes_are_the_layers_and_the_head(tied):
    """Every parameter but the vision tower, without the embedding table unless it is the head."""
    config = one_layer(tied)
    params = abstract_params(Qwen25VL(config))
    t = config.text
    d, f, kv = t.hidden_size, t.intermediate_size, t.num_kv_heads * t.head_dim
    layer = d * d + d + 2 * (d * kv + kv) + d * d + 3 * d * f + 2 * d  # q, k, v (with bias), o, MLP, norms
    expected = 4 * (layer * t.num_layers + d + t.vocab_size * d)  # + final norm + the head (fp32)
    assert roofline.decoder_weight_bytes(params) == expected


def test_stream_bandwidth_reads_a_weight_of_the_asked_size():
    rate, runs = roofline.stream_bandwidth(4 * 64 * 1000, rows=4, k=64, repeats=2)
    assert len(runs.times) == 2 and rate > 0
    assert roofline.matmul_flops(3, 5, 7) == 210


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_bench_forward_reports_its_fraction_of_the_matmul_peak(tmp_path, monkeypatch, family):
    """`bench forward` (tiny) records the roofline columns, with the FLOPs of `forward_flops`, for
    each family against its own `transformers` model on the same weights."""
    from fourd_jax.bench import forward

    monkeypatch.setenv("FOURD_JAX_PERF_FILE", str(tmp_path / "perf.md"))
    result = forward.run(size="tiny", repeats=2, record=True, family=family)
    config = bench_config("tiny", family)
    batch = forward.bench_batch(config, "tiny")
    assert result["GFLOP"] == round(forward.forward_flops(config, batch) / 1e9, 2)
    assert result["tokens"] == batch["input_ids"].size and result["family"] == family
    for column in ("jax of peak", "torch of peak", "matmul peak GFLOP/s", "peak RSS GiB", "jax spread ms"):
        assert column in result
    assert result["jax of peak"].endswith("%") and result["peak RSS GiB"] > 0
    table = (tmp_path / "perf.md").read_text()
    assert "| jax of peak |" in table and str(result["jax ms"]) in table
    np.testing.assert_allclose(float(result["max logit diff"]), 0.0, atol=1e-4)


def test_qwen3_bench_batch_has_one_video_block_per_temporal_patch():
    """The Qwen3-VL bench lays the video out as its processor does: a block per temporal patch, each
    after its timestamp text, on frames cut to multiples of 32 px; the tower's FLOPs count its
    DeepStack mergers and whole-frame attention."""
    from fourd_jax.bench import forward
    from fourd_jax.train.observe import vision_flops_per_patch

    config = bench_config("tiny", "qwen3_vl")
    batch = forward.bench_batch(config, "tiny")
    (t, h, w), frames = batch["video_grid_thw"][0], forward.SIZES["tiny"]["frames"]
    assert t == frames // 2 and h == w == 96 // 16 and "second_per_grid_ts" not in batch
    row = batch["input_ids"][0]
    starts = np.flatnonzero(row == config.vision_start_token_id)
    assert len(starts) == 1 + t  # the image, then one block per temporal patch
    assert all(row[s + 1] == config.video_token_id for s in starts[1:])
    assert all(np.diff(starts[1:]) == h * w // 4 + 2 + forward.TIMESTAMP_TOKENS)
    assert (row == config.video_token_id).sum() == t * h * w // 4
    v = config.vision
    assert config.vision.num_deepstack == v.depth - 1
    without_deepstack = vision_flops_per_patch(dataclasses.replace(config, vision=dataclasses.replace(
        v, deepstack_visual_indexes=())), h * w)
    merged = v.hidden_size * 4
    merger = (2 * merged * merged + 2 * merged * v.out_hidden_size) / 4
    assert vision_flops_per_patch(config, h * w) - without_deepstack == pytest.approx(v.num_deepstack * merger)


def test_bench_sample_reports_its_fraction_of_the_decode_roof():
    """`bench sample` (tiny, 4 prompts x G 2) bounds a call by its prefill at the matmul peak and each
    decode step by a matmul over every decoder weight, and reports the greedy tokens it compared with
    `generate`."""
    from fourd_jax.bench import sample

    result = sample.run(size="tiny", repeats=1, record=False, max_new_tokens=6, rows=8)
    _, _, params = sample.reference_models(bench_config("tiny"))
    assert result["rows"] == 8 and result["prompts x G"] == "4x2" and result["new tokens"] == 6
    assert result["decoder MB"] == round(roofline.decoder_weight_bytes(params) / 1e6, 1)
    # the bound: the prompts' prefill once at the peak, then n steps of a weight-sized matmul
    batch = sample.bench_prompts(bench_config("tiny"), lengths=(24, 40, 16, 32), video_rows=(0, 2))
    # Each column is rounded (ms and GB/s to 0.1 or 0.01, the peak to 0.1 GFLOP/s): the recomputed bounds
    # may differ by what those roundings allow, and no more.
    peak, step_ms = result["prefill peak GFLOP/s"], result["decoder MB"] / result["weight matmul GB/s"]
    prefill_ms = forward_flops(bench_config("tiny"), batch) / (peak * 1e9) * 1e3
    assert abs(result["prefill bound ms"] - prefill_ms) <= 0.05 + 1.01 * prefill_ms * 0.05 / peak
    rounding = 1.01 * step_ms * (0.05 / result["decoder MB"] + 0.05 / result["weight matmul GB/s"]) + 0.005
    assert abs(result["step bound ms"] - step_ms) <= rounding
    assert result["jax of bound"].endswith("%")
    assert result["equal rows"].endswith("/8")
    with pytest.raises(ValueError, match="multiple of 4"):
        sample.run(size="tiny", rows=6, record=False)


def test_bench_train_runs_several_packed_rows_in_bfloat16(tmp_path, monkeypatch):
    """`bench train` as the GPU script runs it (bf16 compute, 4 examples packed two to a row), on the tiny model
    and the CPU: both frameworks' first losses agree, and the FLOPs are the count of its packed batch."""
    from fourd_jax.bench import train
    from fourd_jax.train.dift import flops_fn

    monkeypatch.setenv("FOURD_JAX_PERF_FILE", str(tmp_path / "perf.md"))
    result = train.run(size="tiny", repeats=1, record=True, dtype="bfloat16", examples=4)
    config = latent_bench_config("tiny")
    packed = train.dift_batch(config, packed=True, examples=4)
    assert packed["input_ids"].shape[0] == 2 and result["slots packed"] == packed["input_ids"].size
    assert (packed["segment_ids"].max(axis=1) == 2).all()  # two examples in each row
    assert result["GFLOP"] == round(flops_fn(config)(packed) / 1e9, 2)
    assert result["dtype"] == "bfloat16" and result["examples"] == 4 and result["torch device"] == "cpu"
    assert abs(result["first loss jax"] - result["first loss torch"]) <= 3e-2 * max(1.0, result["first loss torch"])
    assert "jax MFU" not in result  # a CPU has no data-sheet peak
    assert "| bfloat16 |" in (tmp_path / "perf.md").read_text()
    with pytest.raises(InputError, match="even number"):
        train.dift_batch(config, examples=3)


def test_benches_refuse_a_dtype_they_cannot_compute_in():
    from fourd_jax.bench import sample, train

    for bench in (train, sample):
        with pytest.raises(InputError, match=r"^--dtype must be one of float32, bfloat16, not 'float16'\.$"):
            bench.run(size="tiny", record=False, dtype="float16")


def test_repeated_prompts_are_what_num_return_sequences_expands_to():
    """torch's side of an RL rollout batch: each prompt G times in a row, with its own video."""
    from fourd_jax.bench.sample import bench_prompts, repeat_prompts

    batch = bench_prompts(bench_config("tiny"), lengths=(5, 3, 4), video_rows=(0, 2), frames=2, image=56)
    twice = repeat_prompts(batch, 2)
    np.testing.assert_array_equal(twice["input_ids"], batch["input_ids"][[0, 0, 1, 1, 2, 2]])
    np.testing.assert_array_equal(twice["video_grid_thw"], batch["video_grid_thw"][[0, 0, 1, 1]])
    first, second = np.split(batch["pixel_values_videos"], [int(np.prod(batch["video_grid_thw"][0]))])
    np.testing.assert_array_equal(twice["pixel_values_videos"], np.concatenate([first, first, second, second]))


def test_grpo_step_flops_count_the_decoder_three_passes_and_the_frozen_tower_once():
    """Rollout and reference forwards plus the update's forward + backward over each prompt and its G
    completions, and one tower forward per patch (the rollout, the reference and the update share it)."""
    from fourd_jax.bench.rl import grpo_step_flops
    from fourd_jax.train.observe import vision_flops_per_patch

    config = bench_config("tiny")
    no_media = grpo_step_flops(config, prompts=2, prompt_len=10, patches=0, group=4, new_tokens=6)
    tokens = 2 * (10 + 4 * 6)
    forward = decoder_flops_per_token(config, 16, trainable=False)
    assert no_media == pytest.approx(tokens * (2 * forward + decoder_flops_per_token(config, 16)))
    with_media = grpo_step_flops(config, prompts=2, prompt_len=10, patches=64, group=4, new_tokens=6)
    assert with_media - no_media == pytest.approx(64 * vision_flops_per_patch(config))
