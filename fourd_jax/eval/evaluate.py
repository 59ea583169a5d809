"""`fourd-jax eval`: answer every multiple-choice question of a records split with the jitted
sampler (greedy, imagery blocks on) and score the extracted letters per sub-task.

Reads any records this project writes: the synthetic test split, or DSR-Bench / VLM4D imported
with `fourd-jax data import`. The files it leaves are those of `report.write_results`.

Every record is a question in the denominators. One that cannot be scored (its record or media
cannot be read, or it fits no sequence bucket) becomes a wrong `Prediction` with `predicted=None`
and a `reason`, listed by id under "unscored" in results.json; it keeps its sub-task and family
when the record decodes that far, and is counted under the sub-task "unreadable" otherwise.
VLM4D questions also get the report groups of `vlm4d_groups` (real / synthetic, exo- / ego-centric).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import msgpack
import numpy as np
from tqdm import tqdm

from fourd_jax import sharding
from fourd_jax.answers import extract_choice
from fourd_jax.batch import agree_shapes, check_batch_divides, completion_texts, prompt_inputs, row_sharding
from fourd_jax.data import records
from fourd_jax.data.batching import collate
from fourd_jax.data.features import FeatureConfig, featurize
from fourd_jax.data.pipeline import PipelineConfig, build_dataset
from fourd_jax.distributed import gather_ints, gather_json, is_writer
from fourd_jax.errors import InputError
from fourd_jax.eval.report import UNREADABLE, Prediction, accuracy_table, write_results
from fourd_jax.files import as_path
from fourd_jax.load import check_latent_ids, find_model, load_model, load_tokenizer
from fourd_jax.model import lora
from fourd_jax.model.apply import abstract_params
from fourd_jax.model.vlm import Qwen25VL
from fourd_jax.sample import SamplingConfig, generate, sampling_for


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
    max_samples: int = 0  # the first this many records (scored or not) in file order; 0 = the whole split
    video: bool = True  # False: the blind control (no video tokens), for a model trained with data.video=False

    def __post_init__(self) -> None:
        minimums = {"batch_size": 1, "max_new_tokens": 1, "max_frames": 1, "video_max_pixels": 1, "latent_size": 1,
                    "max_latent_blocks": 0, "max_samples": 0}
        for field, minimum in minimums.items():
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise InputError(f"eval {field} must be a whole number >= {minimum}, not {value!r}.")
        if not self.seq_buckets or any(not isinstance(b, int) or b < 1 for b in self.seq_buckets):
            raise InputError(f"eval seq_buckets must be positive whole numbers, not {self.seq_buckets!r}.")


# VLM4D real items with an id up to this are exo-centric, the rest ego-centric (SPEC 5).
VLM4D_EXO_MAX_ID = 922


def vlm4d_groups(meta: dict[str, Any]) -> tuple[str, ...]:
    """The report groups of a VLM4D record, from the `meta` its importer wrote.

    "vlm4d", then the split: "vlm4d/real" or "vlm4d/synthetic", read from the video path (a
    `videos_real` / `videos_synthetic` folder, as released) or else the QA file's name
    (`real_mc.json` / `synthetic_mc.json`), "vlm4d/unknown_split" when neither tells; then for real
    items "vlm4d/real_exo" (id <= 922) or "vlm4d/real_ego", from the original `id` (its trailing
    digits), "vlm4d/real_unknown_view" without one.
    """
    folders = re.split(r"[\\/]", str(meta.get("video", "")).lower())
    stem = Path(str(meta.get("source_file", ""))).stem.lower()
    if "videos_real" in folders:
        split = "real"
    elif "videos_synthetic" in folders:
        split = "synthetic"
    elif stem.startswith("real"):
        split = "real"
    elif stem.startswith("synth"):
        split = "synthetic"
    else:
        return ("vlm4d", "vlm4d/unknown_split")
    if split == "synthetic":
        return ("vlm4d", "vlm4d/synthetic")
    digits = re.search(r"(\d+)\s*$", str(meta.get("original_id", "")))
    if digits is None:
        view = "unknown_view"
    else:
        view = "exo" if int(digits.group(1)) <= VLM4D_EXO_MAX_ID else "ego"
    return ("vlm4d", "vlm4d/real", f"vlm4d/real_{view}")


def record_groups(family: Any, meta: Any) -> tuple[str, ...]:
    """The report groups of a record of `family` with `meta`: `vlm4d_groups` for VLM4D, else none."""
    return vlm4d_groups(meta if isinstance(meta, dict) else {}) if family == "vlm4d" else ()


@dataclasses.dataclass(frozen=True)
class _Question:
    """What is known of one record before it is featurized: enough to score it as wrong."""

    file: Path
    index: int
    sample_id: str
    family: str
    subtask: str
    answer: str
    num_options: int
    groups: tuple[str, ...]
    problem: str | None = None  # why the record itself cannot be decoded


def _question(file: Path, index: int, data: bytes) -> _Question:
    """The identity of a record, from a decode without images; on a decoding error, whatever fields
    of the raw map are still readable (sub-task "unreadable" when its sub-task is not)."""
    try:
        sample = records.decode(data, decode_images=False)
        fields, problem = sample, None
    except records.RecordError as e:
        problem = f"{file} record {index}: {e}"
        try:
            fields = msgpack.unpackb(data, raw=False)
        except Exception:  # noqa: BLE001 - msgpack raises many types for corrupt input
            fields = {}
        fields = fields if isinstance(fields, dict) else {}

    def text(key: str, default: str) -> str:
        value = fields.get(key)
        return value if isinstance(value, str) and value else default

    options = fields.get("options")
    family = text("family", "unknown")
    return _Question(file=file, index=index, sample_id=text("sample_id", f"{file.name}:{index}"), family=family,
                     subtask=text("subtask", UNREADABLE), answer=text("answer", ""),
                     num_options=len(options) if isinstance(options, list) and options else 4,
                     groups=record_groups(family, fields.get("meta")), problem=problem)


def _why_unscored(question: _Question, tokenizer: Any, model_config: Any, features: FeatureConfig) -> str:
    """Why the pipeline dropped a record: its decoding or featurizing error, re-raised here."""
    if question.problem:
        return question.problem
    reader = records.open_reader(question.file)
    try:
        data = reader.read([question.index])[0]
    finally:
        reader.close()
    try:
        featurize(records.decode(data), tokenizer, model_config, features)
    except InputError as e:
        return f"{question.file} record {question.index}: {e}"
    return f"{question.file} record {question.index}: dropped by the input pipeline"


SPLITS = ("train", "val", "test")


def split_directory(data: str | Path, split: str = "test") -> Path:
    """The records to evaluate: DATA/SPLIT when DATA holds splits (train/, val/, test/), else DATA
    itself (a directory or file of records). A DATA with splits but not the one asked for is refused,
    so that training records are never scored in place of held-out ones without a word."""
    data = as_path(data)  # a local directory or a URL (gs://...)
    if split not in SPLITS:
        raise InputError(f"--split must be one of {SPLITS}, not {split!r}.")
    present = [name for name in SPLITS if (data / name).is_dir()]
    if (data / split).is_dir():
        return data / split
    if present:
        raise InputError(f"--data {data} has no {split}/ split (it has {', '.join(p + '/' for p in present)}); pass "
                         f"--split {present[-1]} to score that one.")
    if not data.exists():
        raise InputError(f"--data {data} does not exist.")
    return data


def eval_sampling(model: Qwen25VL, tokenizer: Any, config: EvalConfig) -> SamplingConfig:
    """Greedy decoding with imagery blocks, stopping where the tokenizer and `stop_strings` say."""
    return sampling_for(tokenizer, model.config, config.stop_strings, max_new_tokens=config.max_new_tokens,
                        temperature=0.0, imagery=config.imagery, latent_size=config.latent_size,
                        max_latent_blocks=config.max_latent_blocks)


def predict(model: Qwen25VL, params: Any, tokenizer: Any, records_dir: str | Path, config: EvalConfig,
            progress: bool = True) -> tuple[list[Prediction], int]:
    """Greedy answers to every question under `records_dir` (in file order, the first
    `config.max_samples` when set), with the letters extracted as the 4DThinker evaluation does;
    and how many of them could not be scored.

    Every record gives one Prediction. A record that cannot be read or does not fit the largest
    sequence bucket gives a wrong one (`predicted=None`, `reason` saying why, its sub-task and
    family when the record decodes that far, else sub-task "unreadable"). VLM4D predictions carry
    `vlm4d_groups`. Raises InputError when no question at all can be scored.

    On several processes `config.batch_size` is the global batch: each process answers its share of
    the records (`ShardByJaxProcess`), a process with none left steps with an empty batch until all
    are done, and every process returns all the predictions, in file order (each row's stream
    position is its record's place in the file order).
    """
    mesh = sharding.make_mesh((-1, 1, 1))  # parameters replicated, questions split over the devices
    check_batch_divides(config.batch_size, mesh, "--batch-size")
    rules = sharding.DEFAULT_RULES
    features = FeatureConfig(latent_size=config.latent_size, max_frames=config.max_frames,
                             video_max_pixels=config.video_max_pixels, max_length=max(config.seq_buckets),
                             supervised=False, video=config.video)
    per_process = config.batch_size // jax.process_count()
    pipeline = PipelineConfig(batch_size=per_process, seq_buckets=config.seq_buckets, num_epochs=1,
                              shuffle=False, drop_remainder=False, left_pad=True, features=features)
    sampling = eval_sampling(model, tokenizer, config)
    questions = [_question(file, index, data) for file, index, data in records.read_raw(records_dir)]
    questions = questions[: config.max_samples or None]
    if not questions:
        raise InputError(f"{records_dir} holds no questions to evaluate.")
    # A LoRA model answers with its adapters folded in: the same forward, with no adapter matmuls.
    params = sharding.place(lora.merge(params), sharding.param_shardings(abstract_params(model), mesh, rules))
    # This process's records in scope: stream positions process_index, + process_count, ... below the count.
    quota = len(range(jax.process_index(), len(questions), jax.process_count()))
    empty = collate([], per_process, config.seq_buckets, model.config, config.latent_size, left_pad=True)
    answered: dict[int, Prediction] = {}
    consumed = skipped = 0
    bar = tqdm(total=len(questions), desc="eval", unit="question", disable=not progress or not is_writer())
    batches = iter(build_dataset(records_dir, tokenizer, model.config, pipeline))
    while True:
        batch = next(batches, None) if consumed < quota else None
        read = 0 if batch is None else int(batch["example_mask"].sum()) + int(batch["num_skipped"])
        consumed += read
        status = gather_ints([batch is not None, min(read, max(quota - consumed + read, 0))])
        if not status[:, 0].any():
            break
        # the last batch may read past --max-samples; the bar counts only the questions in scope
        bar.update(int(status[:, 1].sum()))
        batch = agree_shapes(empty if batch is None else batch)
        real = np.asarray(batch["example_mask"], bool)
        skipped += int(batch["num_skipped"])
        # Padding rows get one visible token so every prompt row is well formed.
        batch["attention_mask"] = np.array(batch["attention_mask"])
        batch["attention_mask"][~real, -1] = 1
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            rollout = generate(params, prompt_inputs(batch, mesh, rules), jax.random.key(0), model=model,
                               config=sampling, row_sharding=row_sharding(mesh, rules))
        texts = completion_texts(tokenizer, rollout.tokens, rollout.completion_mask)
        for row in np.flatnonzero(real):
            letters = "ABCDEF"[: int(batch["num_options"][row])]
            answered[int(batch["stream_position"][row])] = Prediction(
                sample_id=str(batch["sample_id"][row]), family=str(batch["family"][row]),
                subtask=str(batch["subtask"][row]), answer=str(batch["answer"][row]),
                predicted=extract_choice(texts[row], letters), num_options=int(batch["num_options"][row]),
                completion=texts[row])
    bar.close()
    answered = gather_answers(answered)

    # Pair the answers with the records in file order; a record without one was dropped by the pipeline.
    predictions: list[Prediction] = []
    for position, q in enumerate(questions):
        if position in answered:
            predictions.append(dataclasses.replace(answered[position], groups=q.groups))
        else:
            predictions.append(Prediction(sample_id=q.sample_id, family=q.family, subtask=q.subtask, answer=q.answer,
                                          predicted=None, num_options=q.num_options, groups=q.groups,
                                          reason=_why_unscored(q, tokenizer, model.config, features)))
    unscored = [p for p in predictions if p.reason is not None]
    if len(unscored) == len(predictions):
        raise InputError(f"{records_dir} holds no question that can be scored: all {len(predictions)} are unreadable "
                         f"or longer than the largest sequence bucket {max(config.seq_buckets)} (first: "
                         f"{unscored[0].reason}).")
    return predictions, len(unscored)


def gather_answers(answered: dict[int, Prediction]) -> dict[int, Prediction]:
    """Every process's answers by stream position (one process: its own)."""
    if jax.process_count() == 1:
        return answered
    every = gather_json([[position, dataclasses.asdict(p)] for position, p in answered.items()])
    return {int(position): Prediction(**{**fields, "groups": tuple(fields["groups"])})
            for share in every for position, fields in share}


def evaluate(checkpoint: str | Path, data: str | Path, out: str | Path, config: EvalConfig = EvalConfig(),
             tokenizer_dir: str | None = None, progress: bool = True, split: str = "test") -> dict:
    """Load a checkpoint (training workdir, Orbax directory or HF directory), answer the split
    (`split_directory`), write O/results.json, results.csv, predictions.jsonl and accuracy.png; return
    the table (`report.accuracy_table`: unscored questions are in every denominator and listed under
    "unscored")."""
    records_dir = split_directory(data, split)
    source = find_model(checkpoint)
    tokenizer_dir = tokenizer_dir or source.tokenizer
    if not tokenizer_dir:
        raise InputError(f"no tokenizer found with {checkpoint}; pass --tokenizer DIR.")
    tokenizer = load_tokenizer(tokenizer_dir, "tokenizer")
    loaded = load_model(source)
    check_latent_ids(tokenizer, loaded.model.config, tokenizer_dir)
    model, params = loaded.model, loaded.params
    predictions, unscored = predict(model, params, tokenizer, records_dir, config, progress=progress)
    if not is_writer():  # every process has every prediction; one writes the files
        return accuracy_table(predictions)
    if unscored:
        print(f"fourd-jax eval: warning: {unscored} of the {len(predictions)} questions of {records_dir} could not "
              f"be scored (unreadable, or longer than the largest sequence bucket {max(config.seq_buckets)}); they "
              f"count as wrong and are listed under \"unscored\" in results.json.")
    return write_results(out, predictions, extra={"checkpoint": str(checkpoint), "data": str(records_dir)})
