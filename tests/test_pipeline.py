"""Grain pipeline: features and labels, fixed batch shapes, resume, bad records, model inputs."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from fourd_jax.data import records
from fourd_jax.data.batching import imagery_segments
from fourd_jax.data.features import FeatureConfig, featurize
from fourd_jax.data.latent_tokens import LATENT_TOKENS
from fourd_jax.data.pipeline import PipelineConfig, RecordSource, build_dataset
from fourd_jax.data.sim.scene import SceneConfig
from fourd_jax.data.synth import SynthConfig, synthesize
from fourd_jax.data.tokenizer import build_tokenizer, config_for_tokenizer, record_texts
from fourd_jax.errors import InputError
from fourd_jax.model.config import tiny
from fourd_jax.model.imagery import chunk_means, segment_means
from fourd_jax.model.inputs import vision_inputs
from fourd_jax.model.positions import get_rope_index

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
    # Fixed per bucket, except the loss positions' width: a power of two >= 16 that fits the batch's
    # most supervised row (a few shapes per bucket, as the buckets themselves).
    fixed = lambda b: {k: np.shape(v) for k, v in b.items() if k != "loss_positions"}  # noqa: E731
    for b in got:
        assert fixed(b) == fixed(got[0])
        rows, width = b["loss_positions"].shape
        assert rows == 3 and width >= 16 and width & (width - 1) == 0 and width <= b["input_ids"].shape[1]
        assert width // 2 < max(16, int((b["loss_positions"] >= 0).sum(axis=1).max()) + 1)
    b = got[0]
    assert b["input_ids"].shape[0] == 3 and int(b["num_skipped"]) == 0
    video = vision_inputs(b, "video")
    assert video.layout.frame_len > 0 and video.patches.shape[:2] == (3, video.layout.unit_slot.shape[1] * 4)
    np.testing.assert_array_equal(b["video_tokens"], (b["input_ids"] == config.video_token_id).sum(1))
    for row in range(3):  # each row's latent pads are fed by that row's imagery targets
        assert b["latent_mask"][row].sum() == (b["imagery_segment"][row] >= 0).any() * (
            b["imagery_segment"][row].max() + 1)


def test_an_epoch_compiles_to_a_few_bucketed_shapes(data):
    """Sequence length = the smallest bucket that holds the batch's longest row; media rows are
    padded to powers of two, so a whole epoch needs only a handful of distinct batch shapes."""
    path, tok, config = data
    buckets = (128, 256, 512, 1024)
    pipeline = PipelineConfig(batch_size=2, seq_buckets=buckets, num_epochs=1, features=FEATURES,
                              drop_remainder=False)
    signatures, count = set(), 0
    for b in build_dataset(path / "train", tok, config, pipeline):
        count += 1
        longest = int(b["attention_mask"].sum(axis=1).max())
        assert b["input_ids"].shape == (2, min(n for n in buckets if n >= longest))
        for key in ("video_patches", "imagery_patches"):
            rows = b[key].shape[1]
            assert rows & (rows - 1) == 0, (key, rows)  # a power of two
        signatures.add(tuple((k, np.shape(v)) for k, v in sorted(b.items())))
    # The loss positions' width (a power of two >= 16 per batch, DATA.md) multiplies the shapes by
    # the few widths the assistant turns take; without it, the buckets and media make at most 6.
    media_and_length = {tuple(kv for kv in sig if kv[0] != "loss_positions") for sig in signatures}
    widths = {dict(sig)["loss_positions"][1] for sig in signatures}
    assert count > 20 and len(media_and_length) <= 6, (count, media_and_length)
    assert widths <= {16, 32, 64, 128, 256, 512, 1024}, widths
    assert len(signatures) <= 10, len(signatures)  # measured: 9 shapes for 40 batches


def test_batched_forward_equals_each_example_alone(data):
    """Per-example media in a padded batch give each row exactly its own example's logits."""
    import jax

    from fourd_jax.data.batching import collate
    from fourd_jax.model.apply import forward, init_params
    from fourd_jax.model.imagery import imagery_targets
    from fourd_jax.model.vlm import Qwen25VL
    from fourd_jax.train.dift import StaticSizes, teacher_forced

    path, tok, config = data
    model = Qwen25VL(config)
    params = init_params(model, jax.random.key(0))
    samples = [s for s in records.read(path / "train")][:6]
    picked = [next(s for s in samples if s["imagery"]), next(s for s in samples if not s["imagery"])]
    feats = [featurize(s, tok, config, FEATURES) for s in picked]
    batch = collate(feats, 3, (512, 1024), config, FEATURES.latent_size)
    out, _ = teacher_forced(params, batch, model, StaticSizes.of(batch))
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


@pytest.mark.parametrize("workers", [0, 2])
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


def _edited(data, edit):
    import msgpack

    packed = msgpack.unpackb(data, raw=False)
    edit(packed)
    return msgpack.packb(packed, use_bin_type=True)


def _short_array(packed, key, shape):
    """Field `key` stored as a float32 array of `shape` (its own bytes cut to fit)."""
    packed[key] = {"shape": list(shape), "data": packed[key]["data"][:4 * int(np.prod(shape))]}


# Each kind of bad record (an edit of a good one) and the reason the strict pipeline gives.
BAD_RECORDS = {
    "truncated": (lambda d: d[: len(d) // 2], "not a msgpack record"),
    "missing field": (lambda d: _edited(d, lambda r: r.pop("question")), "missing field 'question'"),
    "undecodable frame": (lambda d: _edited(d, lambda r: r["frames"].__setitem__(2, b"\x89PNG not really")),
                          "field 'frames' cannot be decoded"),
    "wrong type": (lambda d: _edited(d, lambda r: r.__setitem__("answer", 3)),
                   "field 'answer' holds int 3, not a str value"),
    "frame sizes differ": (lambda d: _edited(d, lambda r: r["frames"].__setitem__(
        1, records.encode_image(np.zeros((8, 8, 3), np.uint8)))), "field 'frames' mixes frame sizes"),
    "short timestamps": (lambda d: _edited(d, lambda r: _short_array(r, "timestamps", [3])),
                         r"field 'timestamps' has shape \(3,\), expected \(8,\)"),
    "mis-shaped poses": (lambda d: _edited(d, lambda r: _short_array(r, "cam_to_world", [8, 3, 4])),
                         r"field 'cam_to_world' has shape \(8, 3, 4\)"),
}


def write_raw(target, items):
    writer = ArrayRecordWriter(str(target), "group_size:1")
    for item in items:
        writer.write(item)
    writer.close()


def test_bad_records_are_skipped_and_counted(data, tmp_path):
    path, tok, config = data
    good = [data for _, _, data in records.read_raw(path / "train")][:3]
    bad = [edit(good[0]) for edit, _ in BAD_RECORDS.values()]
    target = tmp_path / "bad.array_record"
    write_raw(target, [good[0], *bad[:4], good[1], *bad[4:], good[2]])
    pipeline = PipelineConfig(batch_size=10, seq_buckets=(512, 1024), shuffle=False, features=FEATURES)
    (batch,) = list(build_dataset(target, tok, config, pipeline))
    assert int(batch["num_skipped"]) == len(BAD_RECORDS) and batch["example_mask"].sum() == 3
    assert batch["attention_mask"][3:].sum() == 0 and batch["loss_mask"][3:].sum() == 0


@pytest.mark.parametrize("kind", sorted(BAD_RECORDS))
def test_strict_pipeline_names_the_file_record_and_fault(data, tmp_path, kind):
    path, tok, config = data
    good = next(data for _, _, data in records.read_raw(path / "train"))
    edit, reason = BAD_RECORDS[kind]
    target = tmp_path / "bad.array_record"
    write_raw(target, [good, edit(good)])
    strict = PipelineConfig(batch_size=1, seq_buckets=(512, 1024), shuffle=False, skip_bad_records=False,
                            features=FEATURES)
    with pytest.raises(records.RecordError, match=rf"^{target} record 1: {reason}"):
        list(build_dataset(target, tok, config, strict))
    with pytest.raises(records.RecordError, match=rf"^{target} record 1: {reason}"):
        list(records.read(target))


def test_a_truncated_record_file_is_named_not_read_as_empty(data, tmp_path):
    path, tok, config = data
    whole = records.files(path / "train")[0]
    cut = tmp_path / "cut.array_record"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    message = rf"{cut} is not a readable ArrayRecord file \(truncated or corrupt\)"
    with pytest.raises(records.RecordError, match=message):
        list(records.read(cut))
    with pytest.raises(records.RecordError, match=message):
        build_dataset(cut, tok, config)


def test_tokenizer_without_latent_tokens_is_refused(data, tmp_path):
    path, _, config = data
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    plain = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
    with pytest.raises(ValueError, match="no <\\|latent_start\\|>"):
        build_dataset(path / "train", plain, config)


# The layout of Qwen2.5-VL-Instruct's own chat template: numbered media when add_vision_id is set.
QWEN_STYLE_TEMPLATE = (
    "{% set images = namespace(n=0) %}{% set videos = namespace(n=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{% set images.n = images.n + 1 %}"
    "{% if add_vision_id %}Picture {{ images.n }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}{% set videos.n = videos.n + 1 %}"
    "{% if add_vision_id %}Video {{ videos.n }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen_style_tokenizer_dir(path, texts):
    """A directory laid out like a released Qwen2.5-VL tokenizer (class Qwen2Tokenizer with Qwen's
    pre-tokenizer, its special tokens right after the BPE vocabulary, a chat template), without the
    latent tokens, built offline from a small BPE."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    from fourd_jax.data.tokenizer import QWEN_SPECIAL_TOKENS

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
              for m in json.loads(core.to_str())["model"]["merges"]]
    tok = Qwen2Tokenizer(vocab=core.get_vocab(), merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_tokens(list(QWEN_SPECIAL_TOKENS), special_tokens=True)
    tok.chat_template = QWEN_STYLE_TEMPLATE
    tok.save_pretrained(path)
    return path


def test_a_qwen_tokenizer_directory_is_accepted(data, tmp_path):
    from transformers import AutoTokenizer

    from fourd_jax.train import job

    path, _, _ = data
    source = qwen_style_tokenizer_dir(tmp_path / "qwen_tokenizer", list(record_texts(path)))
    before = AutoTokenizer.from_pretrained(source)
    assert type(before).__name__ == "Qwen2Tokenizer" and LATENT_TOKENS[0] not in before.get_vocab()
    workdir = tmp_path / "run"
    workdir.mkdir()
    tok = job.tokenizer(SimpleNamespace(tokenizer=str(source), tokenizer_vocab_size=0), workdir, path, {})
    ids = [tok.convert_tokens_to_ids(t) for t in LATENT_TOKENS]
    assert ids == list(range(len(before), len(before) + 3))  # appended after Qwen's own tokens
    assert [AutoTokenizer.from_pretrained(workdir / "tokenizer").convert_tokens_to_ids(t)
            for t in LATENT_TOKENS] == ids  # the run keeps its copy
    config = config_for_tokenizer(tok, tiny())
    pipeline = PipelineConfig(batch_size=2, seq_buckets=(512, 1024), shuffle=False, features=FEATURES)
    batch = next(b for b in build_dataset(path / "train", tok, config, pipeline) if b["latent_mask"].any())
    row = int(np.argmax(batch["latent_mask"].any(axis=1)))
    text = tok.decode(batch["input_ids"][row][batch["attention_mask"][row] == 1])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                           "<|vision_start|><|video_pad|>")
    assert "<|latent_start|>" + "<|latent_pad|>" * 4 + "<|latent_end|>" in text
    assert batch["latent_mask"][row].sum() % 4 == 0


def test_assistant_turn_modes_and_the_blind_prompt(data):
    path, tok, config = data
    sample = sample_with_imagery(path)
    with_mode = lambda **kw: featurize(sample, tok, config, FeatureConfig(**{**FEATURES.__dict__, **kw}))  # noqa: E731
    imagery = with_mode()
    key = sample["options"]["ABCD".index(sample["answer"])]

    def assistant(f):
        return tok.decode(f["input_ids"][f["prompt_length"]:])

    text = with_mode(assistant="text_trace")
    assert assistant(text) == sample["trace"].replace(" <output_image>", "") + "<|im_end|>"
    assert text["latent_mask"].sum() == 0 and len(text["imagery_grids"]) == 0 and len(imagery["imagery_grids"])
    assert assistant(with_mode(assistant="answer")) == f"<answer>{sample['answer']}. {key}</answer><|im_end|>"
    conclusion = assistant(with_mode(assistant="conclusion"))
    assert conclusion == f"<think>So the answer is: {key}.</think><answer>{sample['answer']}. {key}</answer><|im_end|>"
    assert assistant(imagery).endswith(conclusion.removeprefix("<think>"))  # exactly how every trace ends
    lookup = assistant(with_mode(assistant="option_lookup"))
    stated = lookup.split("So the answer is: ")[1].split(".</think>")[0]
    assert stated in sample["options"]  # one option, not necessarily the key...
    assert lookup.endswith(f"<answer>{'ABCD'[sample['options'].index(stated)]}. {stated}</answer><|im_end|>")
    assert lookup == assistant(with_mode(assistant="option_lookup"))  # ...fixed by the sample id
    drill = lookup.removeprefix("<think>").split(" So the answer is: ")[0]
    pairs = [line.rsplit(" is ", 1) for line in drill.removesuffix(".").split(". ")]
    assert sorted(pairs) == sorted([text, letter] for letter, text in zip("ABCD", sample["options"], strict=True))
    picks = {s["sample_id"]: s for s in records.read(path, decode_images=False)}
    drawn = [featurize(s, tok, config, FeatureConfig(**{**FEATURES.__dict__, "assistant": "option_lookup",
                                                          "video": False})) for s in picks.values()]
    letters = {tok.decode(f["input_ids"][f["prompt_length"]:]).split("<answer>")[1][0] for f in drawn}
    assert len(letters) > 1  # the drawn letters are not the key's pattern of one letter

    blind = with_mode(video=False)
    assert (blind["input_ids"] == config.video_token_id).sum() == 0 and blind["video_patches"].shape[0] == 0
    assert blind["video_grid"].size == 0
    np.testing.assert_array_equal(blind["position_ids"], np.tile(np.arange(len(blind["input_ids"])), (3, 1)))
    # the same question, options and trace, only the video tokens and the vision markers gone
    markers = {config.video_token_id, config.vision_start_token_id, config.vision_end_token_id}
    np.testing.assert_array_equal(blind["input_ids"], [t for t in imagery["input_ids"] if t not in markers])
    with pytest.raises(Exception, match="data.assistant must be one of"):
        FeatureConfig(assistant="essay")


def test_subtask_filter_keeps_only_the_named_subtasks(data):
    path, tok, config = data
    every = list(records.read(path / "train", decode_images=False))
    cameras = sorted(s["sample_id"] for s in every if s["subtask"] == "camera_motion")
    assert 0 < len(cameras) < len(every)  # the fixture mixes sub-tasks
    source = RecordSource(path / "train", ("camera_motion",))
    assert len(source) == len(cameras)
    kept = [records.decode(source[i], decode_images=False) for i in range(len(source))]
    assert sorted(s["sample_id"] for s in kept) == cameras
    # origin() names the file record the filtered index reads
    file, _, k = source.origin(len(source) - 1).rpartition(" record ")
    assert records.decode(source[len(source) - 1])["sample_id"] == list(records.read(file))[int(k)]["sample_id"]
    pipeline = PipelineConfig(batch_size=2, seq_buckets=(512, 1024), num_epochs=1, shuffle=False,
                              subtasks=("camera_motion",), features=FEATURES, drop_remainder=False)
    rows = sum(int(b["example_mask"].sum()) for b in build_dataset(path / "train", tok, config, pipeline))
    assert rows == len(cameras)
    with pytest.raises(InputError, match=r"sub-tasks \['camera_moton'\] \(data.subtasks\)"):
        RecordSource(path / "train", ("camera_moton",))


def test_subtask_filter_still_counts_bad_records(data, tmp_path):
    path, tok, config = data
    good = [data for _, _, data in records.read_raw(path / "train")][:3]
    target = tmp_path / "bad.array_record"
    write_raw(target, [*good, *(edit(good[0]) for edit, _ in BAD_RECORDS.values())])
    subtask = records.decode(good[0], decode_images=False)["subtask"]
    matching = sum(records.decode(g, decode_images=False)["subtask"] == subtask for g in good)
    pipeline = PipelineConfig(batch_size=10, seq_buckets=(512, 1024), shuffle=False, subtasks=(subtask,),
                              features=FEATURES, drop_remainder=False)
    (batch,) = list(build_dataset(target, tok, config, pipeline))
    # every bad edit of a matching record is counted, none silently filtered out
    assert int(batch["num_skipped"]) == len(BAD_RECORDS) and batch["example_mask"].sum() == matching
