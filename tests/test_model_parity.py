"""fp32 logits of our Flax Qwen2.5-VL against `transformers` on the same random weights."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference import Row, hf_logits, make_batch, masked_max_diff

from fourd_jax.errors import InputError
from fourd_jax.model.apply import forward
from fourd_jax.model.config import tiny
from fourd_jax.model.inputs import prepare_vision
from fourd_jax.model.positions import get_rope_index
from fourd_jax.model.vlm import Qwen25VL
from fourd_jax.train.dift import latent_cosine_terms, token_cross_entropy

TOL = 1e-4

# Per reference config: an image grid with partial windows at the edges, and a video with
# several temporal patches whose temporal positions run past their spatial extent.
MEDIA = {
    "a": dict(image=(1, 10, 14), video=(3, 8, 12), seconds=2.0),
    "b": dict(image=(1, 12, 20), video=(2, 12, 8), seconds=2.0),
}


def rows_for(case: str, name: str) -> list[Row]:
    m = MEDIA[name]
    if case == "text":
        return [Row([("text", 23)])]
    if case == "image":
        return [Row([("text", 5), ("image", m["image"]), ("text", 7)])]
    if case == "video":
        return [Row([("text", 4), ("video", m["video"], m["seconds"]), ("text", 6)])]
    # A left-padded batch mixing images, videos and text-only rows.
    return [
        Row([("text", 3), ("image", m["image"]), ("text", 2), ("video", m["video"], m["seconds"]),
             ("text", 4)]),
        Row([("text", 9)]),
        Row([("video", m["video"], 2 * m["seconds"]), ("text", 3), ("image", (1, 4, 4)), ("text", 2)]),
    ]


# Fixed per case: str hashes change from one process to the next.
CASE_SEEDS = {"text": 11, "image": 12, "video": 13, "mixed": 14}


def jax_logits(model, params, batch, public_api=False):
    """Logits through `model.apply` (the documented API, eager) or the jitted `forward`."""
    if public_api:
        return np.asarray(model.apply({"params": params}, **batch).logits)
    return np.asarray(forward(model, params, **batch).logits)


@pytest.mark.parametrize("case", ["text", "image", "video", "mixed"])
def test_logits_match_transformers(reference, case):
    """transformers 5.x places text after a video at start + max(h, w) / merge: compare in that mode."""
    name, torch_model, _, model, params = reference
    batch = make_batch(model.config, rows_for(case, name), seed=CASE_SEEDS[case])
    hf_mode = Qwen25VL(dataclasses.replace(model.config, mrope_text_start="spatial_extent"))
    ours = jax_logits(hf_mode, params, batch, public_api=case in ("text", "mixed"))
    ref = hf_logits(torch_model, batch)
    assert masked_max_diff(ours, ref, batch["attention_mask"]) <= TOL
    assert np.abs(ref).max() > 0.5  # the comparison is not between near-zero logits


def test_blockwise_attention_matches_transformers(reference):
    name, torch_model, _, model, params = reference
    batch = make_batch(model.config, rows_for("mixed", name), seed=CASE_SEEDS["mixed"])
    blocks = Qwen25VL(dataclasses.replace(model.config, mrope_text_start="spatial_extent", attention_block=16))
    assert batch["input_ids"].shape[1] > 16
    ours = jax_logits(blocks, params, batch)
    assert masked_max_diff(ours, hf_logits(torch_model, batch), batch["attention_mask"]) <= TOL


@pytest.mark.parametrize("case", ["video", "mixed"])
def test_reference_positions_match_transformers_given_the_same_positions(reference, case):
    """Default mode (Qwen's reference positions): same network as transformers fed those positions."""
    name, torch_model, _, model, params = reference
    batch = make_batch(model.config, rows_for(case, name), seed=3)
    positions, _ = get_rope_index(model.config, batch["input_ids"], batch.get("image_grid_thw"),
                                  batch.get("video_grid_thw"), batch.get("second_per_grid_ts"),
                                  batch["attention_mask"])
    ours = jax_logits(model, params, batch)
    ref = hf_logits(torch_model, batch, position_ids=positions)
    assert masked_max_diff(ours, ref, batch["attention_mask"]) <= TOL
    # ... and the two position conventions really differ after a video.
    ref_hf_positions = hf_logits(torch_model, batch)
    assert masked_max_diff(ours, ref_hf_positions, batch["attention_mask"]) > 1e-3


def test_rope_index_equals_transformers_in_spatial_extent_mode(reference):
    name, torch_model, _, model, _ = reference
    batch = make_batch(model.config, rows_for("mixed", name), seed=5)
    config = dataclasses.replace(model.config, mrope_text_start="spatial_extent")
    ours, deltas = get_rope_index(config, batch["input_ids"], batch["image_grid_thw"],
                                  batch["video_grid_thw"], batch["second_per_grid_ts"],
                                  batch["attention_mask"])
    keep = batch["attention_mask"].astype(bool)
    ref, ref_deltas = torch_model.model.get_rope_index(
        torch.tensor(batch["input_ids"]), torch.tensor(batch["mm_token_type_ids"]),
        torch.tensor(batch["image_grid_thw"]), torch.tensor(batch["video_grid_thw"]),
        torch.tensor(batch["second_per_grid_ts"]), torch.tensor(batch["attention_mask"]))
    np.testing.assert_array_equal(ours[:, keep], ref.numpy()[:, keep])
    # Where every row ends in text, our slot-based deltas and transformers' real-token deltas put
    # the next token at the same place (generation is compared in test_decode).
    length, n_real = keep.shape[1], keep.sum(1)
    np.testing.assert_array_equal(deltas + length, ours[0, np.arange(len(keep)), -1] + 1)
    assert np.all(ref_deltas.numpy().reshape(-1) + n_real >= deltas + length)


def test_reference_positions_by_hand():
    """Qwen's rule: text after media resumes at (largest media position) + 1."""
    c = tiny()
    v, s, e = c.video_token_id, c.vision_start_token_id, c.vision_end_token_id
    # 2 text, start, a video of t=3 temporal patches on a 2x2 merged grid (12 tokens), end, 1 text.
    ids = np.array([[7, 8, s] + [v] * 12 + [e, 9]])
    pos, delta = get_rope_index(c, ids, video_grid_thw=np.array([[3, 4, 4]]),
                                second_per_grid_ts=np.array([1.5]))
    # interval = tokens_per_second (2) * 1.5 = 3 -> t offsets 0, 3, 6
    t = np.repeat([0, 3, 6], 4) + 3
    h = np.tile([0, 0, 1, 1], 3) + 3
    w = np.tile([0, 1, 0, 1], 3) + 3
    np.testing.assert_array_equal(pos[0, 0], [0, 1, 2, *t, 10, 11])
    np.testing.assert_array_equal(pos[1, 0], [0, 1, 2, *h, 10, 11])
    np.testing.assert_array_equal(pos[2, 0], [0, 1, 2, *w, 10, 11])
    assert delta[0] == 12 - ids.shape[1]


def test_right_padded_batch_matches_transformers(reference):
    name, torch_model, _, model, params = reference
    batch = make_batch(model.config, rows_for("mixed", name), seed=9, pad_left=False)
    hf_mode = Qwen25VL(dataclasses.replace(model.config, mrope_text_start="spatial_extent"))
    ours = jax_logits(hf_mode, params, batch)
    assert masked_max_diff(ours, hf_logits(torch_model, batch), batch["attention_mask"]) <= TOL
    left = make_batch(model.config, rows_for("mixed", name), seed=9, pad_left=True)
    ours_left = jax_logits(hf_mode, params, left)
    for row in range(len(batch["input_ids"])):  # the same tokens give the same logits either way
        np.testing.assert_allclose(ours[row][batch["attention_mask"][row] == 1],
                                   ours_left[row][left["attention_mask"][row] == 1], atol=1e-5)


def test_bfloat16_compute_stays_close_to_float32(reference):
    name, _, _, model, params = reference
    batch = make_batch(model.config, rows_for("mixed", name), seed=4)
    ref = jax_logits(model, params, batch)
    for param_dtype in ("float32", "bfloat16"):
        low = Qwen25VL(model.config.replace(dtype="bfloat16", param_dtype=param_dtype))
        cast = jax.tree_util.tree_map(lambda p, dtype=param_dtype: p.astype(dtype), params)
        out = forward(low, cast, **batch)
        assert out.logits.dtype == jnp.bfloat16 and out.hidden_states.dtype == jnp.bfloat16
        diff = masked_max_diff(out.logits, ref, batch["attention_mask"])
        assert 0 < diff < 0.1 * np.abs(ref).max()


def primitive_dtypes(jaxpr, names):
    """{(primitive, input dtype)} of every equation named in `names`, through nested jaxprs."""
    found = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in names:
            found.update((eqn.primitive.name, str(v.aval.dtype)) for v in eqn.invars if hasattr(v.aval, "dtype"))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found |= primitive_dtypes(inner, names)
    return found


def test_bfloat16_compute_keeps_softmax_norms_and_losses_in_float32(reference):
    """The dtype policy, read off the traced programs: with bf16 weights and compute, every
    exponential, logarithm, max-reduction (softmax) and rsqrt (RMSNorm) runs in float32."""
    name, _, _, model, params = reference
    low = Qwen25VL(model.config.replace(dtype="bfloat16", param_dtype="bfloat16"))
    cast = jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), params)
    batch = make_batch(model.config, rows_for("mixed", name), seed=4)
    jaxpr = jax.make_jaxpr(lambda p: low.apply({"params": p}, **batch).logits)(cast).jaxpr
    reductions = {"exp", "log", "rsqrt", "reduce_max"}
    in_model = primitive_dtypes(jaxpr, reductions)
    assert {op for op, _ in in_model} >= {"exp", "rsqrt", "reduce_max"}
    assert {dtype for _, dtype in in_model} == {"float32"}, in_model
    logits = jnp.zeros((2, 5, 16), jnp.bfloat16)
    hidden = jnp.zeros((2, 5, 8), jnp.bfloat16)
    losses = [jax.make_jaxpr(token_cross_entropy)(logits, jnp.zeros((2, 5), jnp.int32)).jaxpr,
              jax.make_jaxpr(latent_cosine_terms)(hidden, jnp.zeros((2, 3, 8), jnp.bfloat16),
                                                  jnp.zeros((2, 5), bool)).jaxpr]
    for loss in losses:
        ops = primitive_dtypes(loss, reductions | {"sqrt", "div", "reduce_sum", "mul"})
        assert ops and {dtype for _, dtype in ops} <= {"float32", "int32", "bool"}, ops


def test_vision_tower_matches_transformers(reference):
    name, torch_model, _, model, params = reference
    m = MEDIA[name]
    batch = make_batch(model.config, [Row([("video", m["video"], 1.0), ("image", m["image"])])])
    # Two media of different sizes in one call: attention never crosses media items.
    vision = prepare_vision(model.config, batch["pixel_values"], batch["image_grid_thw"],
                            batch["pixel_values_videos"], batch["video_grid_thw"])
    ours = np.asarray(model.apply({"params": params}, vision, method=Qwen25VL.encode_vision))
    with torch.no_grad():
        ref_img = torch_model.model.visual(torch.tensor(batch["pixel_values"]),
                                           grid_thw=torch.tensor(batch["image_grid_thw"])).pooler_output
        ref_vid = torch_model.model.visual(torch.tensor(batch["pixel_values_videos"]),
                                           grid_thw=torch.tensor(batch["video_grid_thw"])).pooler_output
    ref = np.concatenate([ref_img.numpy(), ref_vid.numpy()])
    assert np.abs(ours - ref).max() <= TOL


def test_mismatched_media_inputs_fail_clearly(reference):
    _, _, _, model, params = reference
    batch = make_batch(model.config, rows_for("image", reference[0]))
    bad = dict(batch, pixel_values=batch["pixel_values"][:-4])
    with pytest.raises(InputError, match="`pixel_values` has .* rows but `image_grid_thw` describes"):
        model.apply({"params": params}, **bad)
    bad = dict(batch, input_ids=batch["input_ids"][:, 2:], attention_mask=batch["attention_mask"][:, 2:],
               mm_token_type_ids=None)
    ids = bad["input_ids"].copy()
    ids[ids == model.config.image_token_id] = 1
    bad["input_ids"] = ids
    with pytest.raises(InputError, match="input_ids has 0 image placeholder tokens but the image inputs give"):
        model.apply({"params": params}, **bad)
    with pytest.raises(InputError, match="input_ids has 0 image placeholder tokens"):
        forward(model, params, **bad)
