"""MLLM-4D end to end on the tiny Qwen3-VL, through the installed `fourd-jax` script as a user runs it:
synth (mllm4d records) -> ST-CoT SFT with LoRA -> GRPO with the ST-reward -> eval -> PEFT adapter export
-> the adapter loaded by PyTorch `peft` onto the exported transformers base, with our logits."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import traverse_util
from run_configs import run_script

from fourd_jax.data import records
from fourd_jax.data.features import FeatureConfig, featurize
from fourd_jax.load import load_model, load_tokenizer
from fourd_jax.model import lora
from fourd_jax.model.apply import forward

# 64 px frames, 4 per video: 2 temporal patches of 4 merged tokens each on the tiny Qwen3-VL.
SMALL = ["--config.model.preset=qwen3vl_tiny", "--config.data.seq_buckets=(384,768)", "--config.data.max_frames=4",
         "--config.data.video_max_pixels=4096", "--config.data.imagery_max_pixels=4096",
         "--config.train.checkpoint_every=2"]
LORA_RANK = 8
# The commands run as a user runs them, on one CPU device (not the suite's 8 virtual ones); set for
# them alone, so that this process's devices do not depend on which test initialised JAX first.
ONE_DEVICE = {"XLA_FLAGS": "--xla_backend_optimization_level=0"}


def run_ok(args: list) -> str:
    """`fourd-jax ARGS`, which must succeed; its stdout."""
    done = run_script(args, env=ONE_DEVICE)
    assert done.returncode == 0, f"fourd-jax {' '.join(map(str, args[:2]))} failed:\n{done.stderr[-3000:]}"
    return done.stdout


def metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def flat_params(workdir: Path) -> dict[str, np.ndarray]:
    """The latest checkpoint's parameters, by '/'-joined path."""
    flat = traverse_util.flatten_dict(jax.device_get(load_model(workdir).params), sep="/")
    return {path: np.asarray(leaf) for path, leaf in flat.items()}


def test_mllm4d_recipe_from_synth_to_a_peft_adapter(tmp_path):
    data, sft, grpo, results, export = (tmp_path / name for name in ("data", "sft", "rl", "eval", "hf"))

    # 1. Synthetic MLLM-4D records (every record carries its ST-CoT trace).
    out = run_ok(["synth", "--out", data, "--num-scenes", 10, "--frames", 4, "--image-size", 64,
                  "--families", "mllm4d", "--scenes-per-shard", 5])
    assert f"wrote 10 scenes to {data}" in out
    train = list(records.read(data / "train", decode_images=False))
    assert len(train) >= 4 and {r["family"] for r in train} == {"mllm4d"}
    assert all(r["trace"].startswith("<thinking>Spatial State (Initial Frame):") for r in train)

    # 2. ST-CoT SFT with LoRA: no latent term, the loss is the trace cross-entropy, adapters trained.
    out = run_ok(["dift", "--workdir", sft, "--data", data, "--steps", 2, "--config", "sft:tiny", *SMALL,
                  "--config.data.batch_size=2", "--config.train.eval_batches=0", "--config.train.best_metric=",
                  "--config.optim.warmup_steps=0", "--config.optim.lr=3e-3", "--config.tokenizer_vocab_size=500",
                  f"--config.lora.rank={LORA_RANK}"])
    assert "trained to step 2" in out
    rows = metrics(sft)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["latent_targets"] == 0 and r["latent_loss"] == 0 and r["ce_tokens"] > 0
        assert r["loss"] == pytest.approx(r["ce"], rel=1e-6) and np.isfinite(r["loss"])
    sft_params = flat_params(sft)
    adapters = {p for p in sft_params if lora.is_adapter(p)}
    assert adapters and all(p.startswith("language_model/layers/") for p in adapters)
    assert {sft_params[p].shape[-1] for p in adapters if p.endswith(lora.A)} == {LORA_RANK}  # A: [..., in, r]
    lora_b = [p for p in adapters if p.endswith(lora.B)]
    assert all(np.abs(sft_params[p]).max() > 0 for p in lora_b)  # B starts at 0: SFT moved every adapter

    # 3. GRPO with the ST-reward from the SFT workdir: reward parts logged, only the adapters move.
    out = run_ok(["rl", "--workdir", grpo, "--init", sft, "--steps", 2, "--config", "rl:tiny", *SMALL,
                  "--config.data.batch_size=1", "--config.rl.num_generations=2", "--config.rl.beta=0.001",
                  "--config.sample.max_new_tokens=8", "--config.sample.imagery=False", "--config.optim.lr=3e-3",
                  f"--config.lora.rank={LORA_RANK}"])
    assert "trained to step 2" in out
    rows = metrics(grpo)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for part in ("reward", "reward_std", "reward_format", "reward_accuracy", "reward_camera", "reward_object"):
            assert 0.0 <= r[part] <= 1.0, (part, r)
        # The ST-reward is the weighted sum of its parts (0.2 format, 0.6 accuracy, 0.1 + 0.1 centres).
        assert r["reward"] == pytest.approx(0.2 * r["reward_format"] + 0.6 * r["reward_accuracy"]
                                            + 0.1 * r["reward_camera"] + 0.1 * r["reward_object"], abs=1e-6)
        assert r["completion_length"] <= 8 and r["latent_blocks"] == 0 and r["logprob_drift"] <= 1e-4
    run = json.loads((grpo / "manifest.json").read_text())["config"]
    assert run["model"]["init_from"] == str(sft / "checkpoints") and run["model"]["preset"] == "qwen3vl_tiny"
    assert (run["reward"]["st_format"], run["reward"]["st_accuracy"], run["reward"]["st_camera"],
            run["reward"]["st_object"]) == (0.2, 0.6, 0.1, 0.1)
    # GRPO starts from the SFT model with its adapters folded into the base and fresh adapters on top
    # (B = 0); the base stays exactly that, and every adapter moved.
    rl_params = flat_params(grpo)
    merged = traverse_util.flatten_dict(jax.device_get(lora.merge(load_model(sft).params)), sep="/")
    assert {p for p in rl_params if not lora.is_adapter(p)} == merged.keys()
    for path, leaf in merged.items():
        np.testing.assert_array_equal(rl_params[path], np.asarray(leaf), err_msg=path)
    assert {p for p in rl_params if lora.is_adapter(p)} == adapters
    assert all(np.abs(rl_params[p]).max() > 0 for p in lora_b)

    # 4. Eval of the GRPO checkpoint: results with an accuracy, one prediction per question.
    out = run_ok(["eval", "--checkpoint", grpo, "--data", data, "--split", "train", "--out", results,
                  "--batch-size", 4, "--max-new-tokens", 8, "--max-frames", 4, "--max-pixels", 4096,
                  "--max-samples", 4])
    table = json.loads((results / "results.json").read_text())
    assert table["micro"]["n"] == 4 and table["micro"]["accuracy"] == pytest.approx(table["micro"]["correct"] / 4)
    assert 0.0 <= table["macro"]["accuracy"] <= 1.0 and table["macro"]["chance"] == pytest.approx(0.25)
    predictions = [json.loads(line) for line in (results / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 4 and {p["sample_id"] for p in predictions} <= {r["sample_id"] for r in train}
    assert all(p["family"] == "mllm4d" and p["correct"] == (p["predicted"] == p["answer"]) for p in predictions)
    assert table["micro"]["correct"] == sum(p["correct"] for p in predictions)

    # 5. The PEFT export: adapter files and the base beside them.
    out = run_ok(["convert", "jax-to-hf", grpo, export, "--adapter"])
    assert "wrote PEFT LoRA adapter" in out
    adapter_config = json.loads((export / "adapter_config.json").read_text())
    assert (adapter_config["peft_type"], adapter_config["r"], adapter_config["lora_alpha"]) == ("LORA", LORA_RANK, 16.0)
    assert "model.language_model.layers.0.self_attn.q_proj" in adapter_config["target_modules"]
    assert (export / "adapter_model.safetensors").is_file() and (export / "base" / "config.json").is_file()

    # 6. PyTorch users: peft on the transformers base gives our logits on one processed sample.
    peft = pytest.importorskip("peft")
    from transformers import Qwen3VLForConditionalGeneration

    trained = load_model(grpo)
    config = trained.model.config
    tokenizer = load_tokenizer(grpo / "tokenizer")
    features = FeatureConfig(max_frames=4, video_max_pixels=64 * 64, video_min_pixels=32 * 32,
                             imagery_max_pixels=64 * 64, assistant="text_trace")
    sample = featurize(next(iter(records.read(data / "train"))), tokenizer, config, features)
    ids = np.asarray(sample["input_ids"])[None]
    video = np.asarray(sample["video_patches"])
    grid = np.asarray(sample["video_grid"]).reshape(-1, 3)
    assert (ids == config.video_token_id).sum() == int(np.prod(grid, axis=1).sum()) // 4  # 2x2 merge
    ours = np.asarray(forward(trained.model, trained.params, ids, pixel_values_videos=video,
                              video_grid_thw=grid).logits[0])
    exported = load_model(export)  # our loader on the export (base + adapter) gives the same model
    assert exported.source.adapter == str(export)
    np.testing.assert_allclose(np.asarray(forward(exported.model, exported.params, ids, pixel_values_videos=video,
                                                  video_grid_thw=grid).logits[0]), ours, atol=1e-5)

    base = Qwen3VLForConditionalGeneration.from_pretrained(export / "base", dtype=torch.float32).eval()
    long = ids.astype(np.int64)  # transformers indexes with int64 ids
    inputs = {"input_ids": torch.tensor(long), "attention_mask": torch.ones_like(torch.tensor(long)),
              "pixel_values_videos": torch.tensor(video), "video_grid_thw": torch.tensor(grid.astype(np.int64)),
              "mm_token_type_ids": torch.tensor(np.where(long == config.video_token_id, 2, 0))}
    with torch.no_grad():
        base_logits = base(**inputs).logits[0].float().numpy()
        wrapped = peft.PeftModel.from_pretrained(base, str(export)).eval()
        theirs = wrapped(**inputs).logits[0].float().numpy()
    gap, adapter_effect = np.abs(theirs - ours).max(), np.abs(base_logits - ours).max()
    assert gap <= 1e-4
    assert adapter_effect > 1e-3  # the adapter matters: without it the logits differ
