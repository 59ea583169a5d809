"""Qwen3-VL through the training stages: pipeline batches (per-example media) into the model, latent
imagery targets from the merged tokens, and the sharding rules of its parameters."""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util
from run_configs import load_config

from fourd_jax import families, sharding
from fourd_jax.data import records
from fourd_jax.data.batching import collate, pad_to_agreed, shape_summary
from fourd_jax.data.features import FeatureConfig, featurize
from fourd_jax.data.sim.scene import SceneConfig
from fourd_jax.data.synth import SynthConfig, synthesize
from fourd_jax.data.tokenizer import build_tokenizer, config_for_tokenizer, record_texts
from fourd_jax.eval.evaluate import EvalConfig, evaluate
from fourd_jax.load import load_model
from fourd_jax.model.apply import abstract_params, encode_vision, forward, init_params
from fourd_jax.model.imagery import chunk_means, imagery_targets
from fourd_jax.model.inputs import prepare_vision, vision_inputs
from fourd_jax.model.qwen3vl import Qwen3VL
from fourd_jax.model.qwen3vl_config import qwen3vl_8b, tiny
from fourd_jax.train import dift, rl
from fourd_jax.train.dift import StaticSizes, teacher_forced
from fourd_jax.train.settings import RunSettings

# Frames of 64 x 64 px: 4 x 4 patches of 16 px, 4 merged tokens per temporal patch.
FEATURES = FeatureConfig(max_frames=4, video_max_pixels=64 * 64, video_min_pixels=32 * 32,
                         imagery_max_pixels=64 * 64)
SEQ_BUCKETS = (256, 512, 1024)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen3vl_stages")
    synth = SynthConfig(scene=SceneConfig(num_frames=8, image_size=(64, 64)), scenes_per_shard=2,
                        families=("4dthinker", "dsr"), split_fractions=(0.5, 0.0, 0.5))
    synthesize(out, 4, seed=5, config=synth, progress=False)
    tokenizer = build_tokenizer(record_texts(out / "train"), vocab_size=600)
    tokenizer.save_pretrained(out / "tokenizer")
    config = config_for_tokenizer(tokenizer, tiny())
    model = Qwen3VL(config)
    return out, tokenizer, model, init_params(model, jax.random.key(0))


def test_pipeline_batch_gives_each_example_its_own_logits(data):
    """A collated batch (per-example media [B, P, C], one row of padding) gives each row the logits
    of its example run alone through the processor-output path, latent pads fed the imagery targets."""
    path, tok, model, params = data
    config = model.config
    samples = list(records.read(path / "train"))
    picked = [next(s for s in samples if s["imagery"]), next(s for s in samples if not s["imagery"])]
    feats = [featurize(s, tok, config, FEATURES) for s in picked]
    batch = collate(feats, 3, SEQ_BUCKETS, config, FEATURES.latent_size)
    video = vision_inputs(batch, "video")
    assert video.patches.ndim == 3 and video.layout.interp_index.shape == (*video.patches.shape[:2], 4)
    np.testing.assert_array_equal(batch["video_tokens"], (batch["input_ids"] == config.video_token_id).sum(1))
    out, targets = teacher_forced(params, batch, model, StaticSizes.of(batch))
    checked = 0
    for row, f in enumerate(feats):
        latents = None
        if len(f["imagery_grids"]):
            latents = imagery_targets(model, params, f["imagery_patches"], f["imagery_grids"]).reshape(
                -1, config.text.hidden_size)
            np.testing.assert_allclose(np.asarray(targets[row, :len(latents)]), np.asarray(latents), atol=1e-5)
            checked += 1
        alone = forward(model, params, f["input_ids"][None], pixel_values_videos=f["video_patches"],
                        video_grid_thw=f["video_grid"][None], latent_embeds=latents)
        n = len(f["input_ids"])
        np.testing.assert_allclose(np.asarray(out.logits[row, :n]), np.asarray(alone.logits[0]), atol=2e-5)
        assert np.abs(np.asarray(alone.logits[0])).max() > 0.1
    assert checked == 1


def test_imagery_targets_are_chunk_means_of_the_merged_tokens(data):
    """SPEC 3.2: targets pool the merger's output tokens [U, D], not the DeepStack features."""
    _, _, model, params = data
    rs = np.random.RandomState(0)
    grid = np.array([[1, 4, 8]])
    pixels = rs.randn(32, model.config.vision.patch_dim).astype(np.float32)
    stacked = np.asarray(encode_vision(model, params, prepare_vision(model.config, pixels, grid)))
    assert stacked.shape == (8, 1 + model.config.vision.num_deepstack, model.config.text.hidden_size)
    got = np.asarray(imagery_targets(model, params, pixels, grid, latent_size=4))
    np.testing.assert_allclose(got[0], np.asarray(chunk_means(stacked[:, 0], 4)), atol=1e-6)
    assert not np.allclose(got[0], np.asarray(chunk_means(stacked[:, 1], 4)), atol=1e-3)


def stage_config(name: str, path, **overrides):
    """The packaged `name` config (dift or rl) on the tiny Qwen3-VL and the 64 px records."""
    small = {"model.preset": "qwen3vl_tiny", "tokenizer": str(path / "tokenizer"), "data.seq_buckets": (384, 768),
             "data.max_frames": 4, "data.video_max_pixels": 64 * 64, "data.imagery_max_pixels": 64 * 64,
             "data.batch_size": 4, "mesh.shape": (2, 2, 2), "train.eval_batches": 0, "train.best_metric": "",
             "optim.total_steps": 2, "optim.warmup_steps": 0, "train.checkpoint_every": 2}
    return load_config(name, **{**small, **overrides})


def test_dift_rl_and_eval_run_end_to_end(data, tmp_path):
    """Synthetic records -> DIFT with latent tokens (in-step imagery targets from the tower's merged
    tokens) -> GRPO with the imagery sampler -> eval, all on the tiny Qwen3-VL."""
    path = data[0]
    imagery_subtasks = ("object_distance", "object_direction")  # the 4DThinker questions with imagery
    state = dift.train(RunSettings.of(stage_config("dift", path, **{"data.subtasks": imagery_subtasks})),
                       tmp_path / "dift", data=str(path), steps=2, progress=False)
    assert int(state.step) == 2
    rows = [json.loads(line) for line in (tmp_path / "dift" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
    assert any(r.get("latent_loss", 0) > 0 for r in rows)  # imagery batches fed their latent pads
    loaded = load_model(tmp_path / "dift")
    assert isinstance(loaded.model, Qwen3VL) and loaded.model.config.latent_pad_token_id is not None

    rl_settings = RunSettings.of(stage_config("rl", path, **{"rl.num_generations": 2, "sample.max_new_tokens": 12,
                                                            "optim.total_steps": 1}))
    assert rl_settings.sample.imagery
    rl.train(rl_settings, tmp_path / "rl", init=str(tmp_path / "dift"), data=str(path), steps=1, progress=False)
    rl_rows = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert len(rl_rows) == 1 and np.isfinite(rl_rows[0]["loss"]) and rl_rows[0]["logprob_drift"] <= 1e-4

    config = EvalConfig(batch_size=8, max_new_tokens=8, seq_buckets=(384, 768), max_frames=4,
                        video_max_pixels=64 * 64, max_samples=4)
    table = evaluate(tmp_path / "rl", path, tmp_path / "eval", config, progress=False)
    assert table["micro"]["n"] == 4
    assert len((tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()) == 4


def test_every_qwen3vl_parameter_is_placed_by_the_rules():
    """The rules table names every logical axis of the Qwen3-VL parameters (the learned vision position
    table, DeepStack mergers, q_norm / k_norm) and splits the 8B preset evenly on a 64-chip mesh."""
    boxed = abstract_params(Qwen3VL(qwen3vl_8b()))
    specs = traverse_util.flatten_dict(nn.get_partition_spec(boxed))
    known = {name for name, _ in sharding.DEFAULT_RULES}
    paths = {"/".join(key) for key in specs}
    for part in ("visual/pos_embed/embedding", "visual/deepstack_merger_0/linear_fc1/kernel", "q_norm", "k_norm"):
        assert any(part in p for p in paths), part
    for key, spec in specs.items():
        assert all(name in known for name in spec if name is not None), (key, spec)
    devices = np.array(jax.devices() * 8)[:64]  # shapes only: a 64-way mesh of repeated CPU devices
    mesh = jax.sharding.Mesh(devices.reshape(4, 8, 2), sharding.MESH_AXES)
    sharding.check_rules(boxed, mesh)


@pytest.mark.parametrize("preset", ["qwen3vl_2b", "qwen3vl_4b", "qwen3vl_8b"])
def test_qwen3vl_presets_build_valid_runs(preset):
    for stage in ("dift", "rl"):
        c = load_config(stage, f"{preset},v5p-64")
        settings = RunSettings.of(c)
        assert settings.model.preset == preset and c.mesh.shape == (4, 8, 1) and c.model.dtype == "bfloat16"
        assert c.data.video_max_pixels % (32 * 32) == 0  # whole merge units of Qwen3-VL's 32 px factor
    assert load_config("rl", f"{preset},v5e-64").mesh.shape == (1, 32, 2)
    assert isinstance(families.preset_model(preset), Qwen3VL)


def test_the_mllm4d_grpo_preset_carries_the_recipe():
    c = load_config("rl", "mllm4d_qwen3vl_8b,v5p-64")
    settings = RunSettings.of(c)  # SPEC 5: G 12, beta 0.001, lr 1e-4 on LoRA r 128, temperature 1, 32 frames
    assert (c.rl.num_generations, c.rl.beta, c.optim.lr, c.sample.temperature, c.data.max_frames) == (
        12, 0.001, 1e-4, 1.0, 32)
    assert settings.lora.enabled and c.lora.rank == 128 and c.model.preset == "qwen3vl_8b"
    reward = settings.reward
    assert (reward.st_format, reward.st_accuracy, reward.st_camera, reward.st_object) == (0.2, 0.6, 0.1, 0.1)
    assert c.mesh.shape == (4, 8, 1) and c.optim.grad_accum == 1
    # Its samples (family mllm4d) are scored by the ST-reward: a perfect completion scores 1.0.
    trace = ("<thinking>Initially Camera Center: [0.0, 0.0, 0.0], Object Center: [1.0, 2.0, 3.0]; finally "
             "Camera Center: [1.0, 0.0, 0.0], Object Center: [1.0, 2.0, 4.0].</thinking>")
    scored = rl.sample_reward("mllm4d", trace + "<answer>B</answer>", "B", trace, reward)
    assert scored["reward"] == pytest.approx(1.0) and scored["camera"] == pytest.approx(1.0)
    wrong = rl.sample_reward("mllm4d", trace + "<answer>C</answer>", "B", trace, reward)
    assert wrong["reward"] == pytest.approx(0.4)


def test_batches_padded_to_another_process_give_the_same_rows(data):
    """`pad_to_agreed` grows a Qwen3-VL batch's media rows (padding rows: invalid, zero weights) to
    another process's shapes; its logits and imagery targets stay those of the unpadded batch."""
    path, tok, model, params = data
    config = model.config
    few = featurize(next(s for s in records.read(path / "train") if s["imagery"]), tok, config, FEATURES)
    # The other process's example carries four times the imagery images (only its shapes matter here).
    many = {**few, "imagery_patches": np.concatenate([few["imagery_patches"]] * 4),
            "imagery_grids": np.concatenate([few["imagery_grids"]] * 4)}
    ours = collate([few], 2, SEQ_BUCKETS, config, FEATURES.latent_size)
    other = collate([many, many], 2, SEQ_BUCKETS, config, FEATURES.latent_size)
    padded = pad_to_agreed(ours, np.stack([shape_summary(ours), shape_summary(other)]))
    assert padded["imagery_patches"].shape[1] > ours["imagery_patches"].shape[1]
    out, targets = teacher_forced(params, ours, model, StaticSizes.of(ours))
    out_padded, targets_padded = teacher_forced(params, padded, model, StaticSizes.of(padded))
    n = int(ours["attention_mask"][0].sum())
    np.testing.assert_allclose(np.asarray(out_padded.logits[0, :n]), np.asarray(out.logits[0, :n]), atol=2e-5)
    k = targets.shape[1]
    np.testing.assert_allclose(np.asarray(targets_padded[0, :k]), np.asarray(targets[0]), atol=1e-5)
