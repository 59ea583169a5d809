"""`fourd-jax compile`: a run's jitted programs compiled ahead of time for a TPU slice, on any host.

The programs are the ones training runs (the DIFT step, the GRPO update, the sampler), lowered on
abstract arguments (shapes, dtypes and shardings; nothing is allocated) over the devices of a TPU
topology that libtpu describes without a TPU present, as MaxText's `train_compile.py` does. The
arguments are the run's largest: a batch made by the real featurizer and collator from a sample
at the config's limits (every frame at the pixel budget, four imagery images, SPEC 3.6) and padded
to the largest sequence bucket, repeated to the global batch.

What XLA then reports per device (argument, output and temporary bytes, FLOPs) says whether the
run fits the chips' HBM, before a slice is booked. Two refusals, one sentence each: a program
that does not fit, and a sharding that leaves more than `max_replicated` of the parameter and
optimizer bytes whole on every device (MaxText's check, at its 2% default).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec

from fourd_jax import families, sharding
from fourd_jax.batch import check_batch_divides
from fourd_jax.data.batching import batch_axis, collate, device_arrays
from fourd_jax.data.features import OUTPUT_IMAGE, featurize
from fourd_jax.data.tokenizer import build_tokenizer, config_for_tokenizer
from fourd_jax.errors import InputError
from fourd_jax.model.inputs import PreparedInputs, vision_inputs
from fourd_jax.model.vlm import Qwen25VL
from fourd_jax.sample import generate
from fourd_jax.train import dift, rl
from fourd_jax.train.lora import boxed_params
from fourd_jax.train.observe import decoder_flops_per_token
from fourd_jax.train.optim import make_optimizer, trainable_mask
from fourd_jax.train.settings import RunSettings
from fourd_jax.train.state import TrainState, abstract_state, state_shardings

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    """A Cloud TPU slice as libtpu names its topology, with what one chip holds and computes."""

    topology: str  # libtpu's topology name, e.g. "v5e:4x4"
    chips_per_host: tuple[int, int, int]
    hbm_bytes: int  # per chip
    peak_flops: float  # dense bf16 FLOP/s per chip


# Accelerator types as `gcloud compute tpus` names them (v5p counts TensorCores, 2 per chip). HBM and
# peak bf16 FLOP/s per chip from Cloud TPU's system-architecture pages: v5e 16 GiB, 197 TFLOP/s;
# v5p 95 GiB, 459 TFLOP/s; v6e 32 GiB, 918 TFLOP/s.
_V5E, _V5P, _V6E = (16 * GiB, 197e12), (95 * GiB, 459e12), (32 * GiB, 918e12)
SLICES = {
    "v5e-8": TpuSlice("v5e:2x4", (2, 4, 1), *_V5E), "v5e-16": TpuSlice("v5e:4x4", (2, 2, 1), *_V5E),
    "v5e-64": TpuSlice("v5e:8x8", (2, 2, 1), *_V5E), "v5e-256": TpuSlice("v5e:16x16", (2, 2, 1), *_V5E),
    "v5p-8": TpuSlice("v5p:2x2x1", (2, 2, 1), *_V5P), "v5p-32": TpuSlice("v5p:2x2x4", (2, 2, 1), *_V5P),
    "v5p-64": TpuSlice("v5p:2x4x4", (2, 2, 1), *_V5P), "v5p-128": TpuSlice("v5p:4x4x4", (2, 2, 1), *_V5P),
    "v6e-8": TpuSlice("v6e:2x4", (2, 4, 1), *_V6E), "v6e-16": TpuSlice("v6e:4x4", (2, 2, 1), *_V6E),
    "v6e-64": TpuSlice("v6e:8x8", (2, 2, 1), *_V6E), "v6e-256": TpuSlice("v6e:16x16", (2, 2, 1), *_V6E),
    "v5e-4": TpuSlice("v5e:2x2", (2, 2, 1), *_V5E),  # the smallest multi-chip slice: what the tests compile for
}
STAGES = ("dift", "rl", "sample")
MAX_IMAGERY_IMAGES = 4  # SPEC 3.6: a start frame, up to two middle frames and an end frame


def topology_devices(name: str) -> list[Any]:
    """The devices of TPU slice `name` (a key of SLICES), described by libtpu on this host."""
    if name not in SLICES:
        raise InputError(f"unknown TPU topology {name!r}; choose from {sorted(SLICES)}.")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server off a TPU VM
    # Describing chips drives none, so libtpu's one-process lock (held by any other process that loaded
    # libtpu, e.g. a second compile) need not apply.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        tpu = SLICES[name]
        return list(topologies.get_topology_desc(platform="tpu", topology_name=tpu.topology,
                                                 chip_config_name="default", chips_per_host_bounds=tpu.chips_per_host,
                                                 num_slices=1).devices)
    except Exception as e:  # noqa: BLE001 - without libtpu, jax raises several types here
        hint = "" if importlib.util.find_spec("libtpu") else (
            "; compiling for a TPU needs libtpu on this host: pip install 'libtpu==0.0.42.*'")
        raise InputError(f"cannot describe TPU topology {name} ({str(e).splitlines()[0][:200]}){hint}.") from None


# ----------------------------------------------------------------------------- the largest batch


def worst_case_sample(settings: RunSettings) -> dict[str, Any]:
    """A record at the config's limits: `max_frames` square frames at the video pixel budget (and
    side cap) and MAX_IMAGERY_IMAGES imagery images at theirs, with a trace that shows each."""
    f = settings.data.features
    side = math.isqrt(f.video_max_pixels)
    side = min(side, f.video_max_side) if f.video_max_side else side
    image_side = math.isqrt(f.imagery_max_pixels)
    trace = "<think>" + " ".join(f"Step {i}: {OUTPUT_IMAGE}" for i in range(MAX_IMAGERY_IMAGES)) + "</think>" \
            "<answer>A. left</answer>"
    return {
        "question": "Which way does the camera move?", "options": ["left", "right", "up", "down"], "answer": "A",
        "frames": np.zeros((f.max_frames, side, side, 3), np.uint8), "shown_frames": np.arange(f.max_frames),
        "timestamps": np.arange(f.max_frames, dtype=np.float64), "fps": 1.0,
        "imagery": [np.zeros((image_side, image_side, 3), np.uint8)] * MAX_IMAGERY_IMAGES, "trace": trace,
        "sample_id": "worst_case", "family": "4dthinker", "subtask": "camera_motion",
    }


def largest_host_batch(settings: RunSettings, tokenizer: Any, model_config: Any, supervised: bool, left_pad: bool
                       ) -> dict[str, Any]:
    """One row of the largest batch the run can read: the worst-case sample through the real
    featurizer and collator, padded to the largest sequence bucket."""
    features = dataclasses.replace(settings.data.features, supervised=supervised)
    longest = max(settings.data.seq_buckets)
    try:
        example = featurize(worst_case_sample(settings), tokenizer, model_config, features)
    except InputError as e:
        raise InputError(f"the largest sample this config admits does not fit its largest sequence bucket {longest} "
                         f"({e}); raise data.seq_buckets or lower data.max_frames / data.video_max_pixels.") from None
    return collate([example], 1, (longest,), model_config, features.latent_size, left_pad=left_pad)


def abstract_rows(host_batch: dict[str, Any], rows: int, mesh: Any, rules: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """The device arrays of a one-row host batch as `rows`-row abstract arrays, split over the batch
    axes as `fourd_jax.batch.device_batch` places them."""
    out = {}
    for key, value in device_arrays(host_batch).items():
        axis = batch_axis(key)
        shape = list(value.shape)
        shape[axis] = rows
        spec = [None] * value.ndim
        spec[axis] = sharding.batch_sharding(mesh, 1, rules).spec[0]
        out[key] = jax.ShapeDtypeStruct(tuple(shape), value.dtype, sharding=NamedSharding(mesh, PartitionSpec(*spec)))
    return out


def _rows_sharded(shape: tuple[int, ...], dtype: Any, mesh: Any, rules: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape), rules))


# ----------------------------------------------------------------------------- compiling


@dataclasses.dataclass
class CompileReport:
    """What XLA says of one compiled program, per device, and what follows for the slice."""

    stage: str
    topology: str
    devices: int
    mesh_shape: tuple[int, ...]
    global_batch: int
    seq_len: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    resident_bytes: int  # state held in HBM beside this program's arguments (e.g. the optimizer during sampling)
    hbm_bytes: int
    state_bytes: int  # parameters + optimizer state per device
    replicated_fraction: float  # of parameter + optimizer bytes, held whole on every device
    xla_flops: float  # per step, all devices (XLA's cost analysis)
    model_flops: float  # per step, from the model's shape (fourd_jax.train.observe)
    peak_flops: float  # per chip

    @property
    def peak_bytes(self) -> int:
        """Per-device HBM the program needs: its arguments, outputs not aliased to them, temporaries
        and code, plus the state resident beside it."""
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes
                + self.resident_bytes)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.hbm_bytes

    def step_seconds(self, mfu: float) -> float:
        """The step time the model FLOPs imply at model-FLOPs utilisation `mfu`."""
        return self.model_flops / (self.devices * self.peak_flops * mfu)

    def as_dict(self, mfu: float) -> dict[str, Any]:
        """The report as plain values, with the derived peak, verdict and step time."""
        return {**dataclasses.asdict(self), "peak_bytes": self.peak_bytes, "fits": self.fits, "mfu": mfu,
                "step_seconds": self.step_seconds(mfu)}

    def summary(self, mfu: float) -> str:
        gib = human_bytes
        verdict = "fits" if self.fits else f"does NOT fit: {gib(self.peak_bytes - self.hbm_bytes)} over"
        return "\n".join([
            f"{self.stage} on {self.topology} ({self.devices} chips, mesh (data, fsdp, tensor) = {self.mesh_shape}), "
            f"global batch {self.global_batch} x {self.seq_len} tokens",
            f"  per device: arguments {gib(self.argument_bytes)}, outputs {gib(self.output_bytes)} "
            f"(aliased {gib(self.alias_bytes)}), temporaries {gib(self.temp_bytes)}, code {gib(self.code_bytes)}"
            + (f", resident beside it {gib(self.resident_bytes)}" if self.resident_bytes else ""),
            f"  peak {gib(self.peak_bytes)} of {gib(self.hbm_bytes)} HBM: {verdict}",
            f"  params + optimizer: {gib(self.state_bytes)} per device, {self.replicated_fraction:.2%} replicated",
            f"  FLOPs per step: {self.model_flops:.3e} (from the model's shape; XLA's cost analysis counts each "
            f"scanned layer once: {self.xla_flops:.3e})",
            f"  step time at {mfu:.0%} MFU: {self.step_seconds(mfu):.3g} s",
        ])


def human_bytes(n: float) -> str:
    """Bytes in GiB, or MiB below 1 GiB."""
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / 2**20:.1f} MiB"


def state_bytes(abstract: TrainState) -> tuple[int, float]:
    """(per-device bytes of params + optimizer state, fraction of those bytes replicated on every device)."""
    state = (abstract.params, abstract.opt_state)
    return per_device_bytes(state), sharding.replicated_fraction(state)


def per_device_bytes(tree: Any, float_dtype: Any = None) -> int:
    """Bytes of one device's shards of `tree`; with `float_dtype`, as if its floats were cast to it."""
    def itemsize(dtype):
        cast = float_dtype is not None and jnp.issubdtype(dtype, jnp.floating)
        return jnp.dtype(float_dtype if cast else dtype).itemsize
    return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * itemsize(leaf.dtype)
               for leaf in jax.tree_util.tree_leaves(tree))


def compile_model(settings: RunSettings) -> tuple[Qwen25VL, Any]:
    """(model, tokenizer) of the config's preset with the latent tokens, at the run's numerics. The
    weights a run would load (model.init_from) have the preset's shapes, so they are not read here."""
    if settings.model.preset not in families.preset_names():
        raise InputError(f"model.preset {settings.model.preset!r} is not one of {sorted(families.preset_names())}.")
    # A tokenizer with Qwen's special and latent tokens; only the preset's vocabulary size matters here.
    tokenizer = build_tokenizer(["Which way does the camera move? Step <answer>A. left</answer>"] * 4, vocab_size=300)
    model = families.preset_model(settings.model.preset, config_transform=lambda c: config_for_tokenizer(tokenizer, c),
                                  **settings.model.numerics())
    return model, tokenizer


def compile_stage(settings: RunSettings, stage: str, topology: str) -> CompileReport:
    """Compile `stage`'s program (the DIFT step, the GRPO update or the sampler) for `topology` and
    report its per-device memory, FLOPs and the sharding of its state."""
    if stage not in STAGES:
        raise InputError(f"stage {stage!r} is not one of {STAGES}.")
    if stage != "dift" and settings.rl is None:
        raise InputError(f"stage {stage} compiles the GRPO programs: pass an rl config (--config rl:PRESET).")
    devices = topology_devices(topology)
    mesh = sharding.make_mesh(settings.mesh_shape, devices)
    check_batch_divides(settings.data.batch_size, mesh)
    rules = settings.rules
    model, tokenizer = compile_model(settings)
    params = nn.meta.unbox(boxed_params(model, settings.lora))  # with the LoRA adapters of a LoRA run
    tx = make_optimizer(settings.optim, params)
    shardings = state_shardings(model, tx, mesh, rules, settings.lora)
    state = abstract_state(shardings, model, tx, settings.lora)
    trainable = trainable_mask(params, settings.optim.freeze)
    rows = settings.data.batch_size
    host = largest_host_batch(settings, tokenizer, model.config, supervised=stage == "dift", left_pad=stage != "dift")
    batch = abstract_rows(host, rows, mesh, rules)
    seq_len = host["input_ids"].shape[1]
    resident = 0
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        if stage == "dift":
            sizes = dift.StaticSizes.of(host)
            lowered = dift.jitted_train_step(settings, model, tx, trainable, shardings).lower(state, batch, None,
                                                                                              sizes=sizes)
            tokens = rows * seq_len
            model_flops = (tokens * decoder_flops_per_token(model.config, seq_len)
                           + rows * dift.vision_flops(model.config, host))
        else:
            prompt = PreparedInputs(batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                                    batch["rope_deltas"], vision_inputs({**host, **batch}, "video"))
            sampling = rl.sampling_config(settings, tokenizer, model.config)
            g = settings.rl.num_generations
            key_dtype = jax.eval_shape(lambda: jax.random.key(0)).dtype  # abstract: nothing lands on a device
            key = jax.ShapeDtypeStruct((), key_dtype, sharding=NamedSharding(mesh, PartitionSpec()))
            new_tokens = settings.sample.max_new_tokens
            # The frozen tower's tokens, which the trainer computes once per step and hands to the sampler,
            # the reference and the update (rl.make_rl_trainer); None when the tower trains.
            features = jax.eval_shape(lambda p, x: rl.frozen_vision_features(p, trainable, model, x), state.params,
                                      prompt)
            features = jax.tree_util.tree_map(lambda s: _rows_sharded(s.shape, s.dtype, mesh, rules), features)
            if stage == "sample":
                lowered = generate.lower(state.params, prompt, key, model=model, config=sampling, num_samples=g,
                                         vision_features=features)
                resident = per_device_bytes(state.opt_state) + (
                    per_device_bytes(state.params, model.config.jnp_dtype) if settings.rl.beta else 0)
                model_flops = rows * (seq_len + g * new_tokens) * decoder_flops_per_token(
                    model.config, seq_len + new_tokens, trainable=False)
            else:
                shapes = jax.eval_shape(lambda p, x, k, f: generate(p, x, k, model=model, config=sampling,
                                                                    num_samples=g, vision_features=f),
                                        state.params, prompt, key, features)
                rollout = jax.tree_util.tree_map(lambda s: _rows_sharded(s.shape, s.dtype, mesh, rules), shapes)
                advantages = _rows_sharded((rows * g,), jnp.float32, mesh, rules)
                ref = _rows_sharded((rows * g, new_tokens), jnp.float32, mesh, rules) if settings.rl.beta else None
                update = rl.jitted_update(settings, model, tx, trainable, shardings)
                lowered = update.lower(state, prompt, rollout, advantages, ref, features)
                # the reference policy, in the compute dtype (rl.reference_policy)
                resident = per_device_bytes(state.params, model.config.jnp_dtype) if settings.rl.beta else 0
                # forward + backward per iteration (x3 in the per-token count); the prompt runs once per
                # iteration, shared by its samples and by every micro-batch (rl.update_step)
                model_flops = settings.rl.num_iterations * rows * (seq_len + g * new_tokens) * \
                    decoder_flops_per_token(model.config, seq_len + new_tokens)
        try:
            compiled = lowered.compile()
        except Exception as e:  # noqa: BLE001 - XLA reports an HBM overflow at compile time as a runtime error
            message = str(e)
            if "RESOURCE_EXHAUSTED" in message or "memory" in message.lower():
                line = next((s.strip() for s in message.splitlines() if "hbm" in s.lower() or "memory" in s.lower()),
                            message.splitlines()[0])
                raise InputError(f"{stage} does not fit {topology} with mesh {tuple(mesh.shape.values())} and "
                                 f"global batch {rows} x {seq_len} tokens: {line[:300]}") from None
            raise
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    per_device, replicated = state_bytes(state)
    tpu = SLICES[topology]
    return CompileReport(
        stage=stage, topology=topology, devices=len(devices), mesh_shape=tuple(mesh.shape.values()),
        global_batch=rows, seq_len=seq_len, argument_bytes=memory.argument_size_in_bytes,
        output_bytes=memory.output_size_in_bytes, alias_bytes=memory.alias_size_in_bytes,
        temp_bytes=memory.temp_size_in_bytes, code_bytes=memory.generated_code_size_in_bytes,
        resident_bytes=resident, hbm_bytes=tpu.hbm_bytes, state_bytes=per_device, replicated_fraction=replicated,
        xla_flops=float(cost.get("flops", 0.0)) * len(devices), model_flops=float(model_flops),
        peak_flops=tpu.peak_flops)


def check(report: CompileReport, max_replicated: float) -> None:
    """One sentence when the program does not fit, or too much of the state is replicated."""
    if not report.fits:
        raise InputError(f"{report.stage} needs {report.peak_bytes / GiB:.2f} GiB per device on {report.topology}, "
                         f"more than its {report.hbm_bytes / GiB:.0f} GiB of HBM; shard more (mesh.shape), lower "
                         "data.batch_size, or set model.remat_policy / model.attention_block.")
    if report.replicated_fraction > max_replicated:
        raise InputError(f"{report.replicated_fraction:.1%} of the parameter and optimizer bytes are replicated on "
                         f"every device of {report.topology} (more than {max_replicated:.1%}); map their logical "
                         "axes to mesh axes in mesh.rules.")
