"""fp32 logits, vision tower, DeepStack, positions and greedy decoding of our Flax Qwen3-VL against
`transformers` Qwen3VLForConditionalGeneration on the same random weights (two configs that differ in
tied/untied embeddings, DeepStack indexes, mrope sections, head_dim and GQA ratio)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from qwen3vl_reference import CONFIGS, build_hf_model, make_batch
from reference import Row, hf_logits, masked_max_diff, torch_inputs

from fourd_jax import hf
from fourd_jax.model.apply import forward
from fourd_jax.model.config import TextConfig
from fourd_jax.model.inputs import prepare_inputs, prepare_vision
from fourd_jax.model.qwen3vl import Qwen3VL
from fourd_jax.model.qwen3vl_config import Qwen3TextConfig
from fourd_jax.model.qwen3vl_layout import get_rope_index
from fourd_jax.model.rope import mrope_stream
from fourd_jax.sample import greedy_generate, prepare_prompt

TOL = 1e-5

# Per config: an image grid larger than the learned position grid (upsampled) and one smaller or
# equal (downsampled), a video with several temporal patches.
MEDIA = {
    "a": dict(image=(1, 6, 10), small=(1, 4, 4), video=(3, 4, 6)),
    "b": dict(image=(1, 8, 6), small=(1, 2, 4), video=(2, 6, 4)),
}
CASE_SEEDS = {"text": 11, "image": 12, "video": 13, "mixed": 14}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def qwen3(request, tmp_path_factory):
    """(name, torch model, our model, params): the reference saved by transformers, read by hf.load."""
    directory = tmp_path_factory.mktemp(f"qwen3vl_{request.param}")
    torch_model = build_hf_model(CONFIGS[request.param]())
    torch_model.save_pretrained(directory)
    model, params = hf.load(directory)
    assert isinstance(model, Qwen3VL)
    return request.param, torch_model, model, params


def rows_for(case: str, name: str) -> list[Row]:
    m = MEDIA[name]
    if case == "text":
        return [Row([("text", 19)])]
    if case == "image":
        return [Row([("text", 5), ("image", m["image"]), ("text", 7)])]
    if case == "video":
        return [Row([("text", 4), ("video", m["video"], 1.0), ("text", 6)])]
    # A left-padded batch mixing images, videos and a text-only row.
    return [
        Row([("text", 3), ("image", m["image"]), ("text", 2), ("video", m["video"], 1.0), ("text", 4)]),
        Row([("text", 9)]),
        Row([("video", m["video"], 1.0), ("text", 3), ("image", m["small"]), ("text", 2)]),
    ]


@pytest.mark.parametrize("case", ["text", "image", "video", "mixed"])
def test_logits_match_transformers(qwen3, case):
    name, torch_model, model, params = qwen3
    batch = make_batch(model.config, rows_for(case, name), seed=CASE_SEEDS[case])
    if case in ("text", "mixed"):  # the documented API, eager
        ours = np.asarray(model.apply({"params": params}, **batch).logits)
    else:
        ours = np.asarray(forward(model, params, **batch).logits)
    ref = hf_logits(torch_model, batch)
    assert masked_max_diff(ours, ref, batch["attention_mask"]) <= TOL
    assert np.abs(ref).max() > 0.5  # the comparison is not between near-zero logits


def test_right_padded_batch_matches_transformers(qwen3):
    name, torch_model, model, params = qwen3
    batch = make_batch(model.config, rows_for("mixed", name), seed=9, pad_left=False)
    ours = np.asarray(forward(model, params, **batch).logits)
    assert masked_max_diff(ours, hf_logits(torch_model, batch), batch["attention_mask"]) <= TOL


def test_vision_tower_and_deepstack_features_match_transformers(qwen3):
    """Media of different sizes in one call (a same-frame mask) and a lone video (frames reshaped)."""
    name, torch_model, model, params = qwen3
    m = MEDIA[name]
    batch = make_batch(model.config, [Row([("video", m["video"], 1.0), ("image", m["image"])])])
    calls = [(batch["pixel_values"], batch["image_grid_thw"], batch["pixel_values_videos"], batch["video_grid_thw"]),
             (None, None, batch["pixel_values_videos"], batch["video_grid_thw"])]
    for pixels, grid, video_pixels, video_grid in calls:
        vision = prepare_vision(model.config, pixels, grid, video_pixels, video_grid)
        assert (vision.layout.frame_len == 0) == (pixels is not None)
        ours = np.asarray(model.apply({"params": params}, vision, method=Qwen3VL.encode_vision))
        refs = []
        with torch.no_grad():
            for p, g in ((pixels, grid), (video_pixels, video_grid)):
                if p is not None:
                    out = torch_model.model.visual(torch.tensor(p), grid_thw=torch.tensor(g))
                    refs.append(torch.stack([out.pooler_output, *out.deepstack_features], 1).numpy())
        ref = np.concatenate(refs)
        assert ours.shape == ref.shape == (ref.shape[0], 1 + model.config.vision.num_deepstack,
                                           model.config.text.hidden_size)
        assert np.abs(ours - ref).max() <= TOL


def test_deepstack_features_reach_the_decoder(qwen3):
    """With the DeepStack mergers' outputs zeroed, the logits at and after the image move: the parity
    above depends on them."""
    name, torch_model, model, params = qwen3
    batch = make_batch(model.config, rows_for("image", name), seed=5)
    silenced = jax.tree_util.tree_map_with_path(
        lambda path, x: x * 0 if "deepstack_merger" in jax.tree_util.keystr(path) and "linear_fc2" in
        jax.tree_util.keystr(path) else x, params)
    ref = hf_logits(torch_model, batch)
    assert masked_max_diff(forward(model, params, **batch).logits, ref, batch["attention_mask"]) <= TOL
    assert masked_max_diff(forward(model, silenced, **batch).logits, ref, batch["attention_mask"]) > 1e-3


def test_precomputed_vision_features_give_the_same_logits(qwen3):
    """A frozen tower run once outside (`encode_vision`, as the RL sampler does) carries the DeepStack
    features along with the merged tokens."""
    name, torch_model, model, params = qwen3
    batch = make_batch(model.config, rows_for("mixed", name), seed=6)
    prompt = prepare_inputs(model.config, **batch)
    features = model.apply({"params": params}, prompt.vision, method=Qwen3VL.encode_vision)
    out = model.apply({"params": params}, prompt.input_ids, prompt.attention_mask, position_ids=prompt.position_ids,
                      vision=prompt.vision, vision_features=features)
    assert masked_max_diff(out.logits, hf_logits(torch_model, batch), batch["attention_mask"]) <= TOL


def test_rope_index_equals_transformers(qwen3):
    name, torch_model, model, _ = qwen3
    batch = make_batch(model.config, rows_for("mixed", name), seed=5)
    ours, deltas = get_rope_index(model.config, batch["input_ids"], batch["image_grid_thw"],
                                  batch["video_grid_thw"], None, batch["attention_mask"])
    ref, ref_deltas = torch_model.model.get_rope_index(
        torch.tensor(batch["input_ids"]), torch.tensor(batch["mm_token_type_ids"]),
        torch.tensor(batch["image_grid_thw"]), torch.tensor(batch["video_grid_thw"]),
        torch.tensor(batch["attention_mask"]))
    keep = batch["attention_mask"].astype(bool)
    np.testing.assert_array_equal(ours[:, keep], ref.numpy()[:, keep])
    # transformers counts real tokens, we count cache slots (padding included): the next token's
    # position is the same.
    length, n_real = keep.shape[1], keep.sum(1)
    np.testing.assert_array_equal(deltas + length, ref_deltas.numpy().reshape(-1) + n_real)
    # Every temporal patch of a video is its own block at t = its start: t never runs ahead of h, w.
    video = batch["input_ids"] == model.config.video_token_id
    assert np.all(ours[0][video] <= np.maximum(ours[1][video], ours[2][video]))


def test_interleaved_mrope_streams():
    """Qwen3-VL's (24, 20, 20): t h w t h w ... for 60 frequencies, then t; Qwen2.5-VL's contiguous
    (16, 24, 24): 16 t, 24 h, 24 w."""
    stream = mrope_stream(Qwen3TextConfig())
    np.testing.assert_array_equal(stream[:60], np.tile([0, 1, 2], 20))
    np.testing.assert_array_equal(stream[60:], 0)
    np.testing.assert_array_equal(mrope_stream(TextConfig()), np.repeat([0, 1, 2], [16, 24, 24]))


@pytest.mark.parametrize("media", [False, True])
def test_greedy_generate_matches_transformers(qwen3, media):
    name, torch_model, model, params = qwen3
    rows = ([Row([("text", 3), ("image", MEDIA[name]["image"]), ("text", 2), ("video", MEDIA[name]["video"], 1.0),
                  ("text", 3)]), Row([("text", 6)])] if media else [Row([("text", 9)]), Row([("text", 4)])])
    batch = make_batch(model.config, rows, seed=21)
    n = 16
    with torch.no_grad():
        ref = torch_model.generate(**torch_inputs(batch), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                   pad_token_id=model.config.pad_token_id)
    ref = ref.numpy()[:, batch["input_ids"].shape[1]:]
    ours = np.asarray(greedy_generate(params, prepare_prompt(model, **batch), model=model, max_new_tokens=n))
    np.testing.assert_array_equal(ours, ref)
    assert len(np.unique(ref)) > 3  # the continuation depends on context, not one repeated token


def test_remat_and_bfloat16_compute(qwen3):
    """Rematerialised blocks give the same numbers; bf16 compute stays close to fp32."""
    name, torch_model, model, params = qwen3
    batch = make_batch(model.config, rows_for("image", name), seed=4)
    ref = hf_logits(torch_model, batch)
    remat = Qwen3VL(model.config.replace(remat_policy="full"))
    assert masked_max_diff(forward(remat, params, **batch).logits, ref, batch["attention_mask"]) <= TOL
    low = Qwen3VL(model.config.replace(dtype="bfloat16"))
    out = forward(low, params, **batch)
    assert out.logits.dtype == jnp.bfloat16
    assert 0 < masked_max_diff(out.logits, ref, batch["attention_mask"]) < 0.1 * np.abs(ref).max()
