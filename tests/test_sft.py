"""MLLM-4D's SFT side (SPEC 5): ST-CoT targets from the record geometry, the `sft` configs, the stage
training on synthetic and on imported conversations records with no latent term, and the importer."""

import json
import re

import jax
import numpy as np
import pytest
from PIL import Image
from run_configs import load_config

from fourd_jax import cli, sharding
from fourd_jax.data import importers, records
from fourd_jax.data.pipeline import build_dataset
from fourd_jax.data.qa.mllm4d import center_text
from fourd_jax.data.sim.scene import SceneConfig
from fourd_jax.data.synth import SynthConfig, synthesize
from fourd_jax.data.taxonomy import LETTERS
from fourd_jax.data.tokenizer import build_tokenizer, record_texts
from fourd_jax.errors import InputError
from fourd_jax.train import dift, rewards
from fourd_jax.train.settings import RunSettings

SPEC_LAYOUT = re.compile(  # SPEC 5's trace, every line in its place
    r"<thinking>Spatial State \(Initial Frame\):\n- Camera Center: (\[[^\]]*\]|null)\n"
    r"- Object Center: (\[[^\]]*\]|null)\nSpatial State \(Final Frame\):\n- Camera Center: (\[[^\]]*\]|null)\n"
    r"- Object Center: (\[[^\]]*\]|null)\n[^\n<]+</thinking><answer>([A-D])</answer>")


@pytest.fixture(scope="module")
def mllm4d_data(tmp_path_factory):
    """MLLM-4D records only (12 scenes, 8 frames of 112 px) and a tokenizer trained on them."""
    out = tmp_path_factory.mktemp("mllm4d")
    synthesize(out, 12, seed=3, config=SynthConfig(scene=SceneConfig(num_frames=8, image_size=(112, 112)),
                                                   families=("mllm4d",)), progress=False)
    tokenizer = build_tokenizer(record_texts(out / "train"), vocab_size=500)
    tokenizer.save_pretrained(out / "tokenizer")
    return out, tokenizer


def expected_trace(sample) -> str:
    """The ST-CoT trace recomputed from a record's stored geometry: centres in the first camera's
    axes (camera-from-world of frame 0 applied to world points), 2 decimals, then the sentence."""
    world_from_cam0 = np.asarray(sample["cam_to_world"][0], np.float64)

    def in_cam0(point) -> str:
        local = world_from_cam0[:3, :3].T @ (np.asarray(point, np.float64) - world_from_cam0[:3, 3])
        texts = (np.format_float_positional(v, precision=2, unique=False) for v in local)
        return "[" + ", ".join(text.replace("-0.00", "0.00") for text in texts) + "]"

    row = sample["object_ids"].index(sample["target_objects"][0])
    centres, poses = sample["object_centers"][row], sample["cam_to_world"]
    key = sample["options"][LETTERS.index(sample["answer"])]
    lines = []
    for label, t in (("Initial", 0), ("Final", len(poses) - 1)):
        lines += [f"Spatial State ({label} Frame):", f"- Camera Center: {in_cam0(poses[t][:3, 3])}",
                  f"- Object Center: {in_cam0(centres[t])}"]
    sentence = (f"Comparing the {sample['object_names'][row]}'s centre at the first and last frame, it is "
                f"{key.lower()}.")
    return "<thinking>" + "\n".join(lines) + f"\n{sentence}</thinking><answer>{sample['answer']}</answer>"


def test_st_cot_targets_are_the_spec_trace_of_the_record_geometry(mllm4d_data):
    path, _ = mllm4d_data
    samples = list(records.read(path / "train", decode_images=False))
    assert len(samples) >= 5 and {s["family"] for s in samples} == {"mllm4d"}
    for sample in samples:
        assert sample["trace"] == expected_trace(sample), sample["sample_id"]
        match = SPEC_LAYOUT.fullmatch(sample["trace"])
        assert match and match.group(5) == sample["answer"]
        assert match.group(1) == "[0.00, 0.00, 0.00]"  # the first camera is the origin of its own axes
        # The ST-reward gives the reference trace full marks: the targets are what the reward wants.
        cams = rewards.parse_centers(sample["trace"], "Camera Center")
        objs = rewards.parse_centers(sample["trace"], "Object Center")
        assert rewards.st_reward(sample["trace"], sample["answer"], cams, objs)["reward"] == pytest.approx(1.0)
    assert center_text(None) == "null" and center_text(np.array([-0.001, 1.234, -2.0])) == "[0.00, 1.23, -2.00]"


def test_sft_presets():
    from fourd_jax.configs import sft

    c = sft.get_config("mllm4d_qwen3vl_8b")
    assert (c.model.preset, c.lora.rank, c.lora.alpha, c.optim.lr) == ("qwen3vl_8b", 128, 256.0, 2e-5)
    assert (c.loss.latent_weight, c.loss.ce_weight, c.data.assistant, c.data.max_frames) == (0.0, 1.0, "text_trace", 32)
    assert sft.get_config("mllm4d_qwen3vl_8b,v5p-64").mesh.shape == (4, 8, 1)
    tiny = sft.get_config("tiny")
    assert (tiny.model.preset, tiny.loss.latent_weight, tiny.data.assistant, tiny.lora.rank) == (
        "tiny", 0.0, "text_trace", 8)
    with pytest.raises(InputError, match="unknown preset 'qwen'; choose tiny or mllm4d_qwen3vl_8b"):
        sft.get_config("qwen")


def sft_config(tokenizer_dir, **overrides):
    return load_config("sft", **{"data.seq_buckets": (1024,), "data.batch_size": 4, "optim.warmup_steps": 0,
                                 "optim.lr": 3e-3, "tokenizer": str(tokenizer_dir), **overrides})


def assert_trains_without_latent_term(config, records_dir, tokenizer, steps: int = 4) -> None:
    """Steps on one batch of the records: no latent block is in the sequence, the loss is exactly the
    cross-entropy of the trace tokens, it falls, and only the LoRA adapters move."""
    settings = RunSettings.of(config)
    trainer = dift.make_trainer(settings, tokenizer, sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
    batch = next(iter(build_dataset(records_dir, tokenizer, trainer.model.config, settings.pipeline())))
    assert not batch["latent_mask"].any()
    supervised = tokenizer.decode(batch["input_ids"][0][batch["loss_mask"][0].astype(bool)])
    assert "Spatial State (Initial Frame)" in supervised and "</thinking><answer>" in supervised
    state, losses = trainer.state, []
    before = jax.tree_util.tree_map(np.array, state.params)  # the step donates the state it is given
    for _ in range(steps):
        state, metrics = trainer.step_fn(state, batch)
        assert float(metrics["latent_targets"]) == 0.0 and float(metrics["latent_loss"]) == 0.0
        np.testing.assert_allclose(float(metrics["loss"]), float(metrics["ce"]), rtol=1e-6)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.05, losses
    moved = jax.tree_util.tree_map_with_path(
        lambda path, a, b: (jax.tree_util.keystr(path), bool(np.any(np.asarray(a) != np.asarray(b)))),
        before, state.params)
    changed = {name for name, differs in jax.tree_util.tree_leaves(moved, is_leaf=lambda x: isinstance(x, tuple))
               if differs}
    assert changed and all("lora" in name for name in changed), sorted(changed)[:5]


@pytest.mark.parametrize("model", ["tiny", "qwen3vl_tiny"])
def test_sft_stage_trains_on_mllm4d_records_with_no_latent_term(mllm4d_data, model):
    """On the tiny Qwen2.5-VL and the tiny Qwen3-VL (MLLM-4D's family)."""
    path, tokenizer = mllm4d_data
    assert_trains_without_latent_term(sft_config(path / "tokenizer", **{"model.preset": model}), path / "train",
                                      tokenizer)


def test_fourd_jax_dift_runs_the_sft_config(mllm4d_data, tmp_path, capsys):
    path, _ = mllm4d_data
    assert cli.main(["dift", "--workdir", str(tmp_path / "w"), "--data", str(path), "--steps", "2",
                     "--config", "sft:tiny", "--config.data.seq_buckets=(1024,)",
                     f"--config.tokenizer={path / 'tokenizer'}", "--config.train.eval_batches=1"]) == 0
    assert "trained to step 2" in capsys.readouterr().out
    logged = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in logged if "ce" in m]
    assert len(steps) >= 2 and all(m["latent_targets"] == 0 and m["loss"] == pytest.approx(m["ce"]) for m in steps)


# ----------------------------------------------------------------------------- the conversations importer


def conversation_rows(samples, frame_dir) -> list[dict]:
    """MLLM-4D SFT items from records: frames saved as PNGs (`image`, a frame list) and the question
    with its option lines in the human turn, the trace in the gpt turn."""
    rows = []
    for n, sample in enumerate(samples):
        paths = []
        for t, frame in enumerate(sample["frames"]):
            paths.append(f"frames/{n}_{t}.png")
            Image.fromarray(frame).save(frame_dir / f"{n}_{t}.png")
        options = "\n".join(f"{letter}. {option}" for letter, option in zip(LETTERS, sample["options"], strict=True))
        rows.append({"id": f"item{n}", "image": paths, "conversations": [
            {"from": "human", "value": f"<video>\n{sample['question']}\n{options}"},
            {"from": "gpt", "value": sample["trace"]}]})
    return rows


@pytest.fixture(scope="module")
def imported(mllm4d_data, tmp_path_factory):
    """The synthetic records written as conversations items, one bad item added, imported back."""
    path, _ = mllm4d_data
    out = tmp_path_factory.mktemp("conversations")
    (out / "frames").mkdir()
    samples = list(records.read(path / "train"))
    rows = conversation_rows(samples, out / "frames")
    bad = {**rows[0], "id": "no_answer",
           "conversations": [rows[0]["conversations"][0], {"from": "gpt", "value": "<thinking>x</thinking>"}]}
    (out / "sft.json").write_text(json.dumps([*rows, bad]))
    stats = importers.import_to_records("mllm4d", out / "sft.json", out / "train" / "sft.array_record")
    return samples, out, stats


def test_imported_conversations_become_mllm4d_sft_records(imported):
    samples, out, stats = imported
    assert (stats.read, stats.written, dict(stats.skipped)) == (len(samples) + 1, len(samples), {"bad answer": 1})
    got = list(records.read(out / "train"))
    for sample, record in zip(samples, got, strict=True):
        assert (record["family"], record["source"], record["sample_id"]) == (
            "mllm4d", "mllm4d", f"mllm4d:sft:item{samples.index(sample)}")
        for key in ("question", "options", "answer", "trace", "subtask"):
            assert record[key] == sample[key], key
        np.testing.assert_array_equal(record["frames"], sample["frames"])
        assert record["meta"]["format"] == "conversations"
    with pytest.raises(InputError, match=r"sft\.json.*row .*the gpt turn of field 'conversations' has no <answer>"):
        list(importers.import_mllm4d(out / "sft.json", skip_bad_records=False))


def test_the_sft_stage_trains_on_imported_conversations(imported, mllm4d_data):
    _, out, _ = imported
    path, tokenizer = mllm4d_data
    assert_trains_without_latent_term(sft_config(path / "tokenizer"), out / "train", tokenizer, steps=3)
