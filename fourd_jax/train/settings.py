"""A training run's settings: the `fourd_jax/configs/*.py` ConfigDict turned once, at start-up, into typed,
validated values that flow one way (cli -> job -> trainer -> step).

`RunSettings.of(config)` checks every value and fails with one sentence naming the field before
anything is built or compiled. The stages read only these settings; the ConfigDict itself is kept
(`config`) for what the run writes down (the manifest and the checkpoints' metadata).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from typing import Any

import jax
import ml_collections

from fourd_jax import families, sharding
from fourd_jax.data.features import FeatureConfig
from fourd_jax.data.pipeline import PipelineConfig
from fourd_jax.errors import InputError
from fourd_jax.model import lora as lora_math
from fourd_jax.model.config import REMAT_POLICIES

DTYPES = ("float32", "bfloat16", "float16")
IMAGERY_TARGETS = {"in_step": "pixels", "precomputed": "precomputed"}  # loss.imagery_targets -> features
IMAGERY_TOWERS = ("live", "initial")


_REQUIRED = object()


def _value(config: Any, field: str, default: Any = _REQUIRED) -> Any:
    """config's dotted `field` (`default` when a config predates the field)."""
    value = config
    for part in field.split("."):
        if default is not _REQUIRED and part not in value:
            return default
        value = value[part]
    return value


def _number(config: Any, field: str, kind: type = int, *, minimum: float | None = None,
            maximum: float | None = None, above: float | None = None, default: Any = _REQUIRED) -> Any:
    """config's dotted `field` as `kind`, or one sentence naming the field and the range it must lie in."""
    value = _value(config, field, default)
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and (kind is float or float(value).is_integer()))
    if ok:
        value = kind(value)
        ok = ((minimum is None or value >= minimum) and (maximum is None or value <= maximum)
              and (above is None or value > above))
    if not ok:
        bounds = [f">= {minimum}" if minimum is not None else "", f"> {above}" if above is not None else "",
                  f"<= {maximum}" if maximum is not None else ""]
        wanted = " and ".join(b for b in bounds if b)
        raise InputError(f"{field} must be {'a whole number' if kind is int else 'a number'}"
                         f"{' ' + wanted if wanted else ''}, not {value!r}.")
    return value


def _choice(config: Any, field: str, choices: Any, default: Any = _REQUIRED) -> str:
    value = _value(config, field, default)
    if value not in choices:
        raise InputError(f"{field} must be one of {tuple(choices)}, not {value!r}.")
    return str(value)


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    preset: str
    init_from: str  # "" = random init; an HF directory, an Orbax checkpoint or a training workdir
    dtype: str  # compute
    param_dtype: str  # master weights
    remat_policy: str
    attention_block: int

    def numerics(self) -> dict[str, Any]:
        """The ModelConfig fields a run sets on any model it creates or loads."""
        return dict(dtype=self.dtype, param_dtype=self.param_dtype, remat_policy=self.remat_policy,
                    attention_block=self.attention_block)


@dataclasses.dataclass(frozen=True)
class DataSettings:
    path: str
    batch_size: int  # global
    seq_buckets: tuple[int, ...]
    features: FeatureConfig  # supervised, as DIFT reads records; `RunSettings.pipeline` adapts it
    num_workers: int
    skip_bad_records: bool
    subtasks: tuple[str, ...]
    packed_rows: int = 0  # global; 0 = one example per row

    @property
    def rows(self) -> int:
        """Rows of a global batch on the devices."""
        return self.packed_rows or self.batch_size


@dataclasses.dataclass(frozen=True)
class OptimSettings:
    """AdamW, its schedule, clipping, accumulation and freezing (`train/optim.py` reads these). The
    defaults are a constant rate with the vision tower frozen (what the benchmarks use)."""

    lr: float
    total_steps: int
    min_lr_ratio: float = 1.0
    warmup_steps: int = 0
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float = 1.0
    grad_accum: int = 1
    freeze: tuple[str, ...] = (r"^visual/",)


@dataclasses.dataclass(frozen=True)
class DiftLossConfig:
    """The DIFT loss: L = ce_weight * CE + latent_weight * latent cosine loss (SPEC 3.3)."""

    ce_weight: float = 0.1
    latent_weight: float = 1.0
    imagery_targets: str = "in_step"  # "in_step" (the tower in the step) or "precomputed" (in the records)
    # Which vision tower makes in-step targets: "live", the model's own (SPEC 3.3: it is frozen, so the
    # targets are constants); "initial", a frozen copy of the tower the run started from, for runs that
    # train the tower (a tower that both trains and makes its own targets makes them trivial).
    imagery_tower: str = "live"

    def __post_init__(self) -> None:
        if self.imagery_tower not in IMAGERY_TOWERS:
            raise InputError(f"loss.imagery_tower must be one of {IMAGERY_TOWERS}, not {self.imagery_tower!r}.")


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """The outer loop's checkpoints, validation and stops (`config.train`)."""

    checkpoint_every: int
    keep_checkpoints: int
    eval_batches: int
    best_metric: str | None
    max_nonfinite: int
    peak_flops: float | None


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """LoRA (`config.lora`): the adapters to make (`spec.rank` 0 = off) and the frozen base's dtype."""

    spec: lora_math.LoraSpec
    base_dtype: str  # "" = model.param_dtype

    @property
    def enabled(self) -> bool:
        return self.spec.rank > 0


@dataclasses.dataclass(frozen=True)
class GrpoConfig:
    num_generations: int = 8  # G rollouts per prompt
    epsilon: float = 0.2  # PPO clip
    beta: float = 0.01  # KL weight (0 = no reference forward)
    kl_estimator: str = "k1"  # "k1": logp - ref_logp (4DThinker); "k3": exp(ref - logp) - (ref - logp) - 1
    num_iterations: int = 1  # updates per rollout batch (old log-probs cached from the first)
    aggregation: str = "sequence-mean"  # or "token-mean"
    temperature: float = 1.0  # the policy's temperature: sampling and scoring use the same one
    # True: the policy gradient also reaches the latent-block tokens (start, pads, end), the choice the
    # 4DThinker paper argues against (the `fourd-jax study` ablation); their inputs stay the fed states.
    latent_gradient: bool = False

    def __post_init__(self):
        if self.kl_estimator not in ("k1", "k3"):
            raise InputError(f"rl.kl_estimator must be 'k1' or 'k3', not {self.kl_estimator!r}.")
        if self.aggregation not in ("sequence-mean", "token-mean"):
            raise InputError(f"rl.aggregation must be 'sequence-mean' or 'token-mean', not {self.aggregation!r}.")
        if self.num_iterations < 1 or self.num_generations < 2:
            raise InputError("rl.num_iterations must be >= 1 and rl.num_generations >= 2 (a group needs a spread).")


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """The rollout sampler (`config.sample`); `sampling_config` adds what the tokenizer says."""

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop_strings: tuple[str, ...]
    imagery: bool
    max_latent_blocks: int


@dataclasses.dataclass(frozen=True)
class RewardSettings:
    accuracy: float  # 4DThinker
    format: float
    st_format: float  # MLLM-4D ST-reward
    st_accuracy: float
    st_camera: float
    st_object: float


def _lora(config: Any) -> LoraSettings:
    """`config.lora` validated (a config without the section has LoRA off)."""
    rank = _number(config, "lora.rank", minimum=0, default=0)
    targets = _value(config, "lora.targets", "")
    if not isinstance(targets, str) or (rank and not targets):
        raise InputError(f"lora.targets must be a regex over parameter paths, not {targets!r}.")
    try:
        re.compile(targets)
    except re.error as e:
        raise InputError(f"lora.targets {targets!r} is not a valid regex ({e}).") from None
    spec = lora_math.LoraSpec(
        rank=rank, alpha=_number(config, "lora.alpha", float, above=0, default=16.0),
        dropout=_number(config, "lora.dropout", float, minimum=0, default=0.0), targets=targets)
    if spec.dropout >= 1:
        raise InputError(f"lora.dropout must be below 1, not {spec.dropout!r}.")
    base_dtype = _value(config, "lora.base_dtype", "")
    if base_dtype not in ("",) + DTYPES:
        raise InputError(f"lora.base_dtype must be one of {('',) + DTYPES}, not {base_dtype!r}.")
    return LoraSettings(spec=spec, base_dtype=str(base_dtype))


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """Everything a DIFT or GRPO run reads; `rl`, `sample` and `reward` only for GRPO configs."""

    seed: int
    tokenizer: str  # "" = train the offline BPE on the data (saved to WORKDIR/tokenizer)
    tokenizer_vocab_size: int
    model: ModelSettings
    data: DataSettings
    optim: OptimSettings
    loss: DiftLossConfig
    train: LoopSettings
    mesh_shape: tuple[int, ...]
    rules: tuple  # logical-axis rules: the default table with the config's `mesh.rules` overrides
    rl: GrpoConfig | None
    sample: SampleSettings | None
    reward: RewardSettings | None
    lora: LoraSettings
    config: ml_collections.ConfigDict = dataclasses.field(compare=False, repr=False)

    @classmethod
    def of(cls, config: ml_collections.ConfigDict) -> RunSettings:
        """The validated settings of a `dift` or `rl` config (fourd_jax/configs/)."""
        config = copy.deepcopy(config)
        model = ModelSettings(
            preset=str(config.model.preset), init_from=str(config.model.init_from),
            dtype=_choice(config, "model.dtype", DTYPES), param_dtype=_choice(config, "model.param_dtype", DTYPES),
            remat_policy=_choice(config, "model.remat_policy", REMAT_POLICIES),
            attention_block=_number(config, "model.attention_block", minimum=0))
        if not model.init_from and model.preset not in families.preset_names():
            raise InputError(f"model.preset {model.preset!r} is not one of {sorted(families.preset_names())}.")
        d = config.data
        buckets = tuple(d.seq_buckets)
        if not buckets or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in buckets):
            raise InputError(f"data.seq_buckets must be positive whole numbers, not {buckets!r}.")
        loss = DiftLossConfig(
            ce_weight=_number(config, "loss.ce_weight", float, minimum=0),
            latent_weight=_number(config, "loss.latent_weight", float, minimum=0),
            imagery_targets=_choice(config, "loss.imagery_targets", IMAGERY_TARGETS),
            imagery_tower=_choice(config, "loss.imagery_tower", IMAGERY_TOWERS, default="live"))
        features = FeatureConfig(
            latent_size=_number(config, "data.latent_size", minimum=1),
            max_frames=_number(config, "data.max_frames", minimum=1),
            video_max_pixels=_number(config, "data.video_max_pixels", minimum=1),
            imagery_max_pixels=_number(config, "data.imagery_max_pixels", minimum=1),
            video_max_side=_number(config, "data.video_max_side", minimum=0, default=0),
            max_length=max(buckets), supervised=True, imagery_source=IMAGERY_TARGETS[loss.imagery_targets],
            assistant=str(d.get("assistant", "imagery_trace")), video=bool(d.get("video", True)))
        data = DataSettings(path=str(d.path), batch_size=_number(config, "data.batch_size", minimum=1),
                            seq_buckets=buckets, features=features,
                            num_workers=_number(config, "data.num_workers", minimum=0),
                            skip_bad_records=bool(d.skip_bad_records), subtasks=tuple(d.get("subtasks", ())),
                            packed_rows=_number(config, "data.packed_rows", minimum=0, default=0))
        if data.packed_rows > data.batch_size:
            raise InputError(f"data.packed_rows {data.packed_rows} is more than data.batch_size {data.batch_size} "
                             "(the examples of a batch packed into fewer rows).")
        optim = OptimSettings(
            lr=_number(config, "optim.lr", float, minimum=0),
            min_lr_ratio=_number(config, "optim.min_lr_ratio", float, minimum=0),
            warmup_steps=_number(config, "optim.warmup_steps", minimum=0),
            total_steps=_number(config, "optim.total_steps", minimum=1),
            weight_decay=_number(config, "optim.weight_decay", float, minimum=0),
            b1=_number(config, "optim.b1", float, minimum=0, maximum=1),
            b2=_number(config, "optim.b2", float, minimum=0, maximum=1),
            eps=_number(config, "optim.eps", float, minimum=0),
            clip_norm=_number(config, "optim.clip_norm", float, above=0),
            grad_accum=_number(config, "optim.grad_accum", minimum=1), freeze=tuple(config.optim.freeze))
        lora = _lora(config)
        if lora.enabled:  # only the adapters train: everything else joins the frozen parameters
            optim = dataclasses.replace(optim, freeze=optim.freeze + (lora_math.trained_pattern(),))
        if "rl" not in config and data.rows % optim.grad_accum:
            raise InputError(f"optim.grad_accum {optim.grad_accum} must divide the {data.rows} rows of a batch "
                             "(data.packed_rows, or data.batch_size when not packing).")
        t = config.train
        loop = LoopSettings(
            checkpoint_every=_number(config, "train.checkpoint_every", minimum=1),
            keep_checkpoints=_number(config, "train.keep_checkpoints", minimum=1),
            eval_batches=_number(config, "train.eval_batches", minimum=0), best_metric=t.best_metric or None,
            max_nonfinite=_number(config, "train.max_nonfinite", minimum=1),
            peak_flops=_number(config, "train.peak_flops", float, minimum=0) or None)
        shape = tuple(config.mesh.shape)
        if len(shape) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or not (s >= 1 or s == -1)
                                  for s in shape):
            raise InputError(f"mesh.shape must be three sizes (data, fsdp, tensor), each >= 1 or -1, not {shape!r}.")
        rl = sample = reward = None
        if "rl" in config:
            r, s = config.rl, config.sample
            sample = SampleSettings(
                max_new_tokens=_number(config, "sample.max_new_tokens", minimum=1),
                temperature=_number(config, "sample.temperature", float, minimum=0),
                top_p=_number(config, "sample.top_p", float, above=0, maximum=1),
                top_k=_number(config, "sample.top_k", minimum=0), stop_strings=tuple(s.stop_strings),
                imagery=bool(s.imagery), max_latent_blocks=_number(config, "sample.max_latent_blocks", minimum=0))
            rl = GrpoConfig(
                num_generations=_number(config, "rl.num_generations", minimum=1),
                epsilon=_number(config, "rl.epsilon", float, minimum=0),
                beta=_number(config, "rl.beta", float, minimum=0), kl_estimator=str(r.kl_estimator),
                num_iterations=_number(config, "rl.num_iterations", minimum=1), aggregation=str(r.aggregation),
                temperature=sample.temperature, latent_gradient=bool(r.get("latent_gradient", False)))
            if rl.num_generations % optim.grad_accum:
                raise InputError(f"optim.grad_accum {optim.grad_accum} must divide rl.num_generations "
                                 f"{rl.num_generations} (a GRPO micro-batch holds G / grad_accum samples per prompt).")
            if lora.spec.dropout:
                raise InputError("lora.dropout must be 0 in a GRPO run (its update scores the sampler's tokens with "
                                 "the sampler's model).")
            reward = RewardSettings(**{k: _number(config, f"reward.{k}", float)
                                       for k in ("accuracy", "format", "st_format", "st_accuracy", "st_camera",
                                                 "st_object")})
        return cls(seed=_number(config, "seed"), tokenizer=str(config.tokenizer),
                   tokenizer_vocab_size=_number(config, "tokenizer_vocab_size", minimum=0),
                   model=model, data=data, optim=optim, loss=loss, train=loop, mesh_shape=shape,
                   rules=sharding.resolve_rules(tuple(config.mesh.get("rules", ()))), rl=rl, sample=sample,
                   reward=reward, lora=lora, config=config)

    def replace(self, **fields: Any) -> RunSettings:
        """The settings of this run's config with dotted fields set (e.g. {"model.init_from": path}),
        validated again; the recorded config says the same."""
        config = copy.deepcopy(self.config)
        with config.unlocked():
            for field, value in fields.items():
                *parents, name = field.split(".")
                node = config
                for part in parents:
                    node = node[part]
                node[name] = value
        return RunSettings.of(config)

    def as_dict(self) -> dict[str, Any]:
        """The run's config as plain values: what the manifest and the checkpoints record."""
        return self.config.to_dict()

    def pipeline(self, supervised: bool = True, left_pad: bool = False) -> PipelineConfig:
        """The input pipeline of this process: its share of the global batch, featurized for DIFT
        (`supervised`) or as prompts (GRPO: unsupervised, left-padded)."""
        d = self.data
        return PipelineConfig(batch_size=d.batch_size // jax.process_count(), seq_buckets=d.seq_buckets,
                              packed_rows=0 if left_pad else d.packed_rows // jax.process_count(),
                              seed=self.seed, num_epochs=None, num_workers=d.num_workers,
                              skip_bad_records=d.skip_bad_records, subtasks=d.subtasks, left_pad=left_pad,
                              features=dataclasses.replace(d.features, supervised=supervised))

