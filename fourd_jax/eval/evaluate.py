"""`fourd-jax eval`: answer every multiple-choice question of a records split with the jitted
sampler (greedy, imagery blocks on) and score the extracted letters per sub-task.

Reads any records this project writes: the synthetic test split, or DSR-Bench / VLM4D imported
with `fourd-jax data import`. The files it leaves are those of `report.write_results`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from tqdm import tqdm

from fourd_jax import sharding
from fourd_jax.data.features import FeatureConfig
from fourd_jax.data.pipeline import PipelineConfig, build_dataset
from fourd_jax.errors import InputError
from fourd_jax.eval.report import Prediction, write_results
from fourd_jax.model.vlm import Qwen25VL
from fourd_jax.sample import SamplingConfig, generate, tokenizer_stops
from fourd_jax.train import loop
from fourd_jax.train.rewards import extract_choice
from fourd_jax.train.rl import decode_completions, prompt_inputs


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 8
    max_new_tokens: int = 64
    seq_buckets: tuple[int, ...] = (512, 1024, 2048, 4096)
    max_frames: int = 16
    video_max_pixels: int = 448 * 448
    latent_size: int = 4
    imagery: bool = True
    max_latent_blocks: int = 8
    stop_strings: tuple[str, ...] = ("</answer>",)
    max_samples: int = 0  # 0 = the whole split


def split_directory(data: str | Path) -> Path:
    """The records to evaluate: DATA/test when DATA holds splits, else DATA itself."""
    data = Path(data)
    if (data / "test").is_dir():
        return data / "test"
    if not data.is_dir():
        raise InputError(f"--data {data} is not a directory of records.")
    return data


def eval_sampling(model: Qwen25VL, tokenizer: Any, config: EvalConfig) -> SamplingConfig:
    eos, stops = tokenizer_stops(tokenizer, config.stop_strings)
    return SamplingConfig(max_new_tokens=config.max_new_tokens, temperature=0.0, eos_token_ids=eos,
                          stop_sequences=stops, pad_token_id=int(model.config.pad_token_id or 0),
                          imagery=config.imagery, latent_size=config.latent_size,
                          max_latent_blocks=config.max_latent_blocks)


def predict(model: Qwen25VL, params: Any, tokenizer: Any, records_dir: str | Path, config: EvalConfig,
            progress: bool = True) -> tuple[list[Prediction], int]:
    """Greedy answers to every question under `records_dir` (in file order), with the letters
    extracted as the 4DThinker evaluation does; and how many records could not be read or did
    not fit the largest sequence bucket (skipped, never scored)."""
    if jax.process_count() > 1:
        raise InputError("fourd-jax eval runs in one process; evaluate on one host.")
    mesh = sharding.make_mesh((-1, 1, 1))  # parameters replicated, questions split over the devices
    loop.check_batch_divides(config.batch_size, mesh)
    rules = sharding.DEFAULT_RULES
    features = FeatureConfig(latent_size=config.latent_size, max_frames=config.max_frames,
                             video_max_pixels=config.video_max_pixels, max_length=max(config.seq_buckets),
                             supervised=False)
    pipeline = PipelineConfig(batch_size=config.batch_size, seq_buckets=config.seq_buckets, num_epochs=1,
                              shuffle=False, drop_remainder=False, left_pad=True, features=features)
    sampling = eval_sampling(model, tokenizer, config)
    out: list[Prediction] = []
    skipped = 0
    bar = tqdm(desc="eval", unit="question", disable=not progress)
    for batch in build_dataset(records_dir, tokenizer, model.config, pipeline):
        real = np.asarray(batch["example_mask"], bool)
        skipped += int(batch["num_skipped"])
        # Padding rows of the last batch get one visible token so every prompt row is well formed.
        batch["attention_mask"][~real, -1] = 1
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            rollout = generate(params, prompt_inputs(batch, mesh, rules), jax.random.key(0), model=model,
                               config=sampling)
        texts = decode_completions(tokenizer, loop.local_rows(rollout.tokens), loop.local_rows(rollout.completion_mask))
        for row in np.flatnonzero(real):
            letters = "ABCDEF"[: int(batch["num_options"][row])]
            out.append(Prediction(sample_id=str(batch["sample_id"][row]), family=str(batch["family"][row]),
                                  subtask=str(batch["subtask"][row]), answer=str(batch["answer"][row]),
                                  predicted=extract_choice(texts[row], letters),
                                  num_options=int(batch["num_options"][row]), completion=texts[row]))
        bar.update(int(real.sum()))
        if config.max_samples and len(out) >= config.max_samples:
            break
    bar.close()
    if not out:
        raise InputError(f"{records_dir} holds no questions to evaluate ({skipped} records were skipped: unreadable, "
                         f"or longer than the largest sequence bucket {max(config.seq_buckets)}).")
    return out[: config.max_samples or None], skipped


def evaluate(checkpoint: str | Path, data: str | Path, out: str | Path, config: EvalConfig = EvalConfig(),
             tokenizer_dir: str | None = None, progress: bool = True) -> dict:
    """Load a checkpoint (training workdir, Orbax directory or HF directory), answer the split,
    write O/results.json, results.csv, predictions.jsonl and accuracy.png; return the table."""
    from transformers import AutoTokenizer

    from fourd_jax import checkpoint as orbax_checkpoint
    from fourd_jax.convert import hf
    from fourd_jax.model.imagery import LATENT_TOKENS
    from fourd_jax.train.job import resolve_checkpoint

    source, found_tokenizer = resolve_checkpoint(checkpoint)
    tokenizer_dir = tokenizer_dir or found_tokenizer
    if not tokenizer_dir:
        raise InputError(f"no tokenizer found with {checkpoint}; pass --tokenizer DIR.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    except (OSError, ValueError) as e:
        raise InputError(f"tokenizer {tokenizer_dir} could not be loaded ({str(e).splitlines()[0]}).") from None
    if (Path(source) / "config.json").exists():
        model, params = hf.load(source)
    else:
        model, params = orbax_checkpoint.restore_params(source)
    ids = tuple(tokenizer.convert_tokens_to_ids(t) for t in LATENT_TOKENS)
    if model.config.latent_token_ids is not None and ids != tuple(model.config.latent_token_ids):
        raise InputError(f"tokenizer {tokenizer_dir} maps the latent tokens to {ids}, but the model expects "
                         f"{tuple(model.config.latent_token_ids)}; pass the tokenizer the model was trained with.")
    records_dir = split_directory(data)
    predictions, skipped = predict(model, params, tokenizer, records_dir, config, progress=progress)
    if skipped:
        print(f"fourd-jax eval: warning: {skipped} records of {records_dir} were skipped (unreadable, or longer "
              f"than the largest sequence bucket {max(config.seq_buckets)}); they are not in the accuracy.")
    return write_results(out, predictions, extra={"checkpoint": str(checkpoint), "data": str(records_dir),
                                                  "skipped_records": skipped})
