"""Grain pipeline: features and labels, fixed batch shapes, resume, bad records, model inputs."""

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from fourd_jax.data import records
from fourd_jax.data.batching import imagery_segments, vision_inputs
from fourd_jax.data.features import FeatureConfig, featurize
from fourd_jax.data.pipeline import PipelineConfig, build_dataset
from fourd_jax.data.sim.scene import SceneConfig
from fourd_jax.data.synth import SynthConfig, synthesize
from fourd_jax.data.tokenizer import build_tokenizer, config_for_tokenizer, record_texts
from fourd_jax.model import tiny
from fourd_jax.model.imagery import LATENT_TOKENS, chunk_means, segment_means
from fourd_jax.model.rope import get_rope_index

FEATURES = FeatureConfig(max_frames=6, video_max_pixels=112 * 112, imagery_max_pixels=112 * 112)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    config = SynthConfig(scene=SceneConfig(num_frames=8, image_size=(112, 112)), scenes_per_shard=2)
    synthesize(out, 5, seed=11, config=config, progress=False)
    tokenizer = build_tokenizer(record_texts(out), vocab_size=600)
    return out, tokenizer, config_for_tokenizer(tokenizer, tiny())


def sample_with_imagery(path):
    return next(s for s in records.read(path) if s["imagery"])


def test_features_of_a_traced_sample(data):
    path, tok, config = data
    sample = sample_with_imagery(path)
    f = featurize(sample, tok, config, FEATURES)
    ids = f["input_ids"]
    pad = tok.convert_tokens_to_ids(LATENT_TOKENS[1])
    assert (ids == config.video_token_id).sum() == np.prod(f["video_grid"]) // 4
    assert f["latent_mask"].sum() == 4 * len(sample["imagery"]) == 4 * len(f["imagery_grids"])
    np.testing.assert_array_equal(f["targets"][:-1], ids[1:])
    p = f["prompt_length"]
    assert f["loss_mask"][: p - 1].sum() == 0 and f["loss_mask"][-1] == 0
    supervised = np.flatnonzero(f["loss_mask"])
    assert supervised[0] == p - 1 and supervised[-1] == len(ids) - 2
    assert not np.any(ids[supervised + 1] == pad)  # pads are never CE targets...
    assert np.all(f["loss_mask"][np.flatnonzero(ids == pad) - 1] == 0)
    starts = np.flatnonzero(ids == tok.convert_tokens_to_ids(LATENT_TOKENS[0]))
    assert np.all(f["loss_mask"][starts - 1] == 1)  # ...but latent_start / latent_end are
    assert tok.decode(ids[p:]).endswith("</answer><|im_end|>")
    assert "<|video_pad|>" not in tok.decode(ids[p:]) and "<output_image>" not in tok.decode(ids)
    positions, _ = get_rope_index(config, ids[None], video_grid_thw=f["video_grid"][None],
                                  second_per_grid_ts=np.array([f["second_per_grid"]]))
    np.testing.assert_array_equal(f["position_ids"], positions[:, 0])
    prompt_only = featurize(sample, tok, config, FeatureConfig(**{**FEATURES.__dict__, "supervised": False}))
    np.testing.assert_array_equal(prompt_only["input_ids"], ids[:p])
    assert prompt_only["loss_mask"].sum() == 0 and len(prompt_only["imagery_grids"]) == 0


def batches(data, n, **overrides):
    path, tok, config = data
    pipeline = PipelineConfig(batch_size=3, seq_buckets=(512, 1024), num_epochs=None, features=FEATURES, **overrides)
    it = iter(build_dataset(path / "train", tok, config, pipeline))
    return it, [next(it) for _ in range(n)]


def test_batches_have_fixed_shapes_and_model_ready_media(data):
    _, _, config = data
    _, got = batches(data, 4)
    shapes = {k: np.shape(v) for k, v in got[0].items()}
    for b in got[1:]:
        assert {k: np.shape(v) for k, v in b.items()} == shapes
    b = got[0]
    assert b["input_ids"].shape[0] == 3 and int(b["num_skipped"]) == 0
    video = vision_inputs(b, "video")
    assert video.layout.frame_len > 0 and video.patches.shape[:2] == (3, video.layout.unit_slot.shape[1] * 4)
    np.testing.assert_array_equal(b["video_tokens"], (b["input_ids"] == config.video_token_id).sum(1))
    for row in range(3):  # each row's latent pads are fed by that row's imagery targets
        assert b["latent_mask"][row].sum() == (b["imagery_segment"][row] >= 0).any() * (
            b["imagery_segment"][row].max() + 1)


def test_batched_forward_equals_each_example_alone(data):
    """Per-example media in a padded batch give each row exactly its own example's logits."""
    import jax

    from fourd_jax.data.batching import collate
    from fourd_jax.model import Qwen25VL, forward, init_params
    from fourd_jax.model.imagery import imagery_targets
    from fourd_jax.train.dift import teacher_forced

    path, tok, config = data
    model = Qwen25VL(config)
    params = init_params(model, jax.random.key(0))
    samples = [s for s in records.read(path / "train")][:6]
    picked = [next(s for s in samples if s["imagery"]), next(s for s in samples if not s["imagery"])]
    feats = [featurize(s, tok, config, FEATURES) for s in picked]
    batch = collate(feats, 3, (512, 1024), config, FEATURES.latent_size)
    out, _ = teacher_forced(params, batch, model, (int(batch["video_frame_len"]), int(batch["imagery_frame_len"])))
    for row, f in enumerate(feats):
        latents = None
        if len(f["imagery_grids"]):
            latents = imagery_targets(model, params, f["imagery_patches"], f["imagery_grids"]).reshape(
                -1, config.text.hidden_size)
        alone = forward(model, params, f["input_ids"][None], pixel_values_videos=f["video_patches"],
                        video_grid_thw=f["video_grid"][None], second_per_grid_ts=np.array([f["second_per_grid"]]),
                        latent_embeds=latents)
        n = len(f["input_ids"])
        np.testing.assert_allclose(np.asarray(out.logits[row, :n]), np.asarray(alone.logits[0]), atol=2e-5)


def test_imagery_segments_are_chunk_means():
    grids = np.array([[1, 4, 6], [1, 8, 8]])  # 6 and 16 merged tokens
    seg = imagery_segments(grids, 4, 4, units=32)
    np.testing.assert_array_equal(seg[:6], [0, 1, 2, 3, -1, -1])
    np.testing.assert_array_equal(seg[6:22], np.repeat([4, 5, 6, 7], 4))
    assert np.all(seg[22:] == -1)
    tokens = np.random.RandomState(0).randn(32, 5).astype(np.float32)
    means = np.asarray(segment_means(tokens, seg, 32))
    np.testing.assert_allclose(means[:4], chunk_means(tokens[:6], 4), atol=1e-6)
    np.testing.assert_allclose(means[4:8], chunk_means(tokens[6:22], 4), atol=1e-6)


@pytest.mark.parametrize("workers", [0, 1])
def test_restored_iterator_gives_the_same_next_batches(data, workers):
    it, _ = batches(data, 3, num_workers=workers)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    path, tok, config = data
    fresh = iter(build_dataset(path / "train", tok, config,
                               PipelineConfig(batch_size=3, seq_buckets=(512, 1024), num_epochs=None,
                                              features=FEATURES, num_workers=workers)))
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        for key in ("input_ids", "loss_mask", "video_patches", "imagery_patches", "position_ids"):
            np.testing.assert_array_equal(got[key], want[key])
        assert list(got["sample_id"]) == list(want["sample_id"])


def corrupt_copy(path, target):
    """Records of `path` with, among them, a truncated record, one lacking 'question' and one whose
    frame is not a decodable image."""
    raw = [data for _, _, data in records.read_raw(path)][:6]
    import msgpack

    missing = msgpack.unpackb(raw[1], raw=False)
    del missing["question"]
    broken_frame = msgpack.unpackb(raw[5], raw=False)
    broken_frame["frames"][2] = b"\x89PNG not really"
    bad = [raw[0], raw[2][: len(raw[2]) // 2], msgpack.packb(missing, use_bin_type=True), raw[3],
           msgpack.packb(broken_frame, use_bin_type=True), raw[4]]
    writer = ArrayRecordWriter(str(target), "group_size:1")
    for item in bad:
        writer.write(item)
    writer.close()


def test_bad_records_are_skipped_and_counted_or_named(data, tmp_path):
    path, tok, config = data
    target = tmp_path / "bad.array_record"
    corrupt_copy(path / "train", target)
    pipeline = PipelineConfig(batch_size=6, seq_buckets=(512, 1024), shuffle=False, features=FEATURES)
    (batch,) = list(build_dataset(target, tok, config, pipeline))
    assert int(batch["num_skipped"]) == 3 and batch["example_mask"].sum() == 3
    assert batch["attention_mask"][3:].sum() == 0 and batch["loss_mask"][3:].sum() == 0
    strict = PipelineConfig(batch_size=6, seq_buckets=(512, 1024), shuffle=False, skip_bad_records=False,
                            features=FEATURES)
    with pytest.raises(records.RecordError, match=rf"{target} record 1: not a msgpack record"):
        list(build_dataset(target, tok, config, strict))
    with pytest.raises(records.RecordError, match="missing field 'question'"):
        records.decode(msgpack_record(target, 2))
    with pytest.raises(records.RecordError, match="field 'frames' cannot be decoded"):
        records.decode(msgpack_record(target, 4))


def msgpack_record(path, index):
    return [data for _, _, data in records.read_raw(path)][index]


def test_tokenizer_without_latent_tokens_is_refused(data, tmp_path):
    path, _, config = data
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    plain = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
    with pytest.raises(ValueError, match="no <\\|latent_start\\|>"):
        build_dataset(path / "train", plain, config)
