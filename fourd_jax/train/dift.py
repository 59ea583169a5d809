"""Dynamic-Imagery Fine-Tuning (SPEC 3.3): the loss and one jitted training step.

    L = ce_weight * CE(answer/trace tokens) + latent_weight * mean_p (1 - cos(h[p-1], target[p]))

The imagery targets come from the frozen vision tower inside the step (stop-gradient): each
imagery image's merged tokens averaged in latent_size chunks (`segment_means`), fed as the input
embeddings of the `<|latent_pad|>` positions and predicted by the final hidden state one
position earlier. Losses are sums with token counts taken over the whole (global) batch, so
gradient accumulation over micro-batches and data parallelism give the exact batch mean.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fourd_jax.batch import device_batch
from fourd_jax.data.batching import batch_axis
from fourd_jax.errors import InputError
from fourd_jax.model import lora
from fourd_jax.model.imagery import segment_means
from fourd_jax.model.inputs import vision_inputs
from fourd_jax.model.vlm import Qwen25VL
from fourd_jax.train import job, observe
from fourd_jax.train.accumulate import accumulate, split_rows
from fourd_jax.train.job import Trainer
from fourd_jax.train.optim import stop_frozen, trainable_mask
from fourd_jax.train.settings import DiftLossConfig, RunSettings
from fourd_jax.train.state import TrainState, guarded_update


def latent_cosine_terms(hidden: jax.Array, targets: jax.Array, latent_mask: jax.Array) -> jax.Array:
    """(1 - cos(h[p-1], target of pad p)) at every position p-1 before a latent pad, else 0.

    hidden [B, L, D]; targets [B, K, D] (row k feeds the k-th pad of the batch row); latent_mask
    [B, L]. Computed in float32.
    """
    predicts = jnp.pad(latent_mask[:, 1:], ((0, 0), (0, 1)))  # position t predicts the pad at t + 1
    order = jnp.cumsum(latent_mask, axis=1) - 1
    which = jnp.clip(jnp.pad(order[:, 1:], ((0, 0), (0, 1))), 0, targets.shape[1] - 1)
    wanted = jnp.take_along_axis(targets.astype(jnp.float32), which[..., None], axis=1)
    h = hidden.astype(jnp.float32)
    cos = jnp.sum(h * wanted, -1) / jnp.maximum(jnp.linalg.norm(h, axis=-1) * jnp.linalg.norm(wanted, axis=-1), 1e-8)
    return jnp.where(predicts, 1.0 - cos, 0.0)


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log p(target) per position, float32.

    The target is picked with a one-hot product rather than a gather: the gradient of a gather is
    a scatter, which XLA runs far slower than a dense multiply on CPU and no faster elsewhere.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(logp * jax.nn.one_hot(targets, logp.shape[-1], dtype=logp.dtype), axis=-1)


class StaticSizes(NamedTuple):
    """The sizes of a pipeline batch that shape the compiled step (static arguments of the jit)."""

    video_frame_len: int
    imagery_frame_len: int

    @classmethod
    def of(cls, batch: dict[str, Any]) -> StaticSizes:
        return cls(int(batch["video_frame_len"]), int(batch["imagery_frame_len"]))


def teacher_forced(params: Any, batch: dict[str, Any], model: Qwen25VL, sizes: StaticSizes,
                   compute_logits: bool = True, target_tower: Any = None):
    """(model output, imagery targets [B, K, D]) of a pipeline batch with the targets fed at the
    latent pads, as DIFT trains. `target_tower`: the vision-tower params (`params["visual"]`'s
    structure) that make the targets; None = the model's own."""
    if "latent_targets" in batch:  # precomputed in the records by the same frozen tower
        targets = batch["latent_targets"]
    else:
        imagery = vision_inputs({**batch, "imagery_frame_len": sizes.imagery_frame_len}, "imagery")
        tower = params if target_tower is None else {**params, "visual": target_tower}
        tokens = jax.lax.stop_gradient(model.apply({"params": tower}, imagery, method="merged_tokens"))
        targets = segment_means(tokens, batch["imagery_segment"], tokens.shape[1])
    out = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                      position_ids=batch["position_ids"], segment_ids=batch.get("segment_ids"),
                      vision=vision_inputs({**batch, "video_frame_len": sizes.video_frame_len}, "video"),
                      latent_embeds=targets, compute_logits=compute_logits, rngs=lora.rngs())
    return out, targets


def at_positions(x: jax.Array, positions: jax.Array) -> jax.Array:
    """x[b, positions[b, w]] for x [B, L, ...] and positions [B, W]; zero where a position is -1."""
    picked = jnp.take_along_axis(x, jnp.maximum(positions, 0).reshape(*positions.shape, *[1] * (x.ndim - 2)),
                                 axis=1)
    return jnp.where((positions >= 0).reshape(*positions.shape, *[1] * (x.ndim - 2)), picked, 0)


def loss_sums(params: Any, batch: dict[str, Any], model: Qwen25VL, sizes: StaticSizes,
              target_tower: Any = None) -> dict[str, jax.Array]:
    """Summed CE and latent losses over a (micro-)batch.

    Logits are computed only at each row's supervised positions (`loss_positions`: the assistant
    turns), not over the prompts and their video tokens: the LM head and its softmax are a large
    share of a step's FLOPs and the largest activation ([B, L, vocab]) when most of a sequence is video.
    """
    out, targets = teacher_forced(params, batch, model, sizes, compute_logits=False, target_tower=target_tower)
    positions = batch["loss_positions"]
    logits = model.apply({"params": params}, at_positions(out.hidden_states, positions), method=Qwen25VL.logits,
                         rngs=lora.rngs())
    ce = (token_cross_entropy(logits, at_positions(batch["targets"], positions))
          * at_positions(batch["loss_mask"], positions))
    latent = latent_cosine_terms(out.hidden_states, targets, batch["latent_mask"])
    return {"ce_sum": ce.sum(), "latent_sum": latent.sum()}


def counts(batch: dict[str, Any]) -> dict[str, jax.Array]:
    return {"ce_count": batch["loss_mask"].sum(), "latent_count": batch["latent_mask"].sum().astype(jnp.float32)}


def train_step(state: TrainState, batch: dict[str, Any], target_tower: Any = None, *, model: Qwen25VL,
               tx: optax.GradientTransformation, trainable: Any, loss_config: DiftLossConfig, sizes: StaticSizes,
               grad_accum: int = 1, lora_dropout: float = 0.0) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update from a batch (split into `grad_accum` micro-batches). `target_tower`: the
    frozen vision-tower params that make the imagery targets (None = the model's own). `lora_dropout`:
    the rate of LoRA adapter input dropout, drawn from the state's key and step (so a resume repeats it).

    A step whose loss or gradient norm is not finite leaves params and optimizer state as they
    were and bumps the non-finite counters; the loop stops after too many in a row.
    """
    n = counts(batch)
    weights = {"ce_sum": loss_config.ce_weight / jnp.maximum(n["ce_count"], 1.0),
               "latent_sum": loss_config.latent_weight / jnp.maximum(n["latent_count"], 1.0)}

    dropout_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def objective(params, micro):
        with lora.dropout(lora_dropout, dropout_key):
            sums = loss_sums(stop_frozen(params, trainable), micro, model, sizes, target_tower)
        return sum(weights[k] * v for k, v in sums.items()), sums

    grad_fn = jax.value_and_grad(objective, has_aux=True)
    if grad_accum == 1:
        (loss, sums), grads = grad_fn(state.params, batch)
    else:
        micro_batches = {key: split_rows(x, grad_accum, batch_axis(key)) for key, x in batch.items()}
        ((loss, sums), grads), _ = accumulate(lambda micro: (grad_fn(state.params, micro), ()), micro_batches)
    new_state, grad_norm, finite = guarded_update(state, grads, loss, tx)
    metrics = {
        "loss": loss, "ce": sums["ce_sum"] / jnp.maximum(n["ce_count"], 1.0),
        "latent_loss": sums["latent_sum"] / jnp.maximum(n["latent_count"], 1.0),
        "grad_norm": grad_norm, "ce_tokens": n["ce_count"], "latent_targets": n["latent_count"],
        "tokens": batch["attention_mask"].sum().astype(jnp.float32), "finite": finite,
    }
    return new_state, metrics


# ----------------------------------------------------------------------------- the trainer


def jitted_train_step(settings: RunSettings, model: Qwen25VL, tx: optax.GradientTransformation, trainable: Any,
                      shardings: TrainState):
    """The compiled DIFT step of a run: `train_step` with the state donated and kept on `shardings`
    (what the trainer runs, and what `fourd-jax compile` lowers for a TPU topology)."""
    return jax.jit(functools.partial(train_step, model=model, tx=tx, trainable=trainable, loss_config=settings.loss,
                                     grad_accum=settings.optim.grad_accum, lora_dropout=settings.lora.spec.dropout),
                   static_argnames=("sizes",), donate_argnums=0, out_shardings=(shardings, None))


def make_trainer(settings: RunSettings, tokenizer: Any, mesh: Any) -> Trainer:
    """Model, params (created or loaded sharded), optimizer, state at step 0 and the jitted step."""
    rules, loss_config = settings.rules, settings.loss
    model, params = job.model_and_params(settings, tokenizer, mesh)
    trainable = trainable_mask(params, settings.optim.freeze)
    tower_trains = any(jax.tree_util.tree_leaves(trainable["visual"]))
    in_step_imagery = (loss_config.imagery_targets == "in_step"
                       and settings.data.features.assistant == "imagery_trace")
    if tower_trains and loss_config.imagery_tower == "live" and loss_config.latent_weight and in_step_imagery:
        raise InputError("The vision tower trains (optim.freeze leaves parameters of visual/ trainable) and would "
                         "make its own imagery targets; set loss.imagery_tower='initial' (a frozen copy).")
    # The initial tower, copied before the state (which each step donates) takes the params. A resumed
    # run rebuilds the same copy: the initial params come from the seed or from model.init_from.
    target_tower = (jax.tree_util.tree_map(jnp.copy, params["visual"]) if loss_config.imagery_tower == "initial"
                    else None)
    tx, shardings, state, schedule = job.optimizer_and_state(settings, model, params, mesh)
    step = jitted_train_step(settings, model, tx, trainable, shardings)

    sums = jax.jit(lambda params, batch, tower, sizes: {**loss_sums(params, batch, model, sizes, tower),
                                                        **counts(batch)}, static_argnames=("sizes",))

    def on_device(fn):
        def call(state, batch):
            with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
                return fn(state, device_batch(batch, mesh, rules), target_tower, sizes=StaticSizes.of(batch))
        return call

    eval_fn = on_device(lambda state, batch, tower, sizes: sums(state.params, batch, tower, sizes))
    return Trainer(model, tx, shardings, state, on_device(step), schedule, pipeline=settings.pipeline(),
                   flops_fn=flops_fn(model.config),
                   validation=lambda batches: validation(eval_fn, batches, loss_config))


def validation(eval_fn: Any, batches: Any, loss_config: DiftLossConfig):
    """evaluate(state) -> {"val_loss", "val_ce", "val_latent_loss"} over a fixed list of host batches,
    each term averaged over all its tokens (as the training loss is over a batch). `eval_fn(state,
    batch)`: the summed losses and their counts."""
    def evaluate(state: TrainState) -> dict[str, float]:
        total = {"ce_sum": 0.0, "latent_sum": 0.0, "ce_count": 0.0, "latent_count": 0.0}
        for batch in batches:
            for key, value in jax.device_get(eval_fn(state, batch)).items():
                total[key] += float(value)
        ce = total["ce_sum"] / max(total["ce_count"], 1.0)
        latent = total["latent_sum"] / max(total["latent_count"], 1.0)
        return {"val_loss": loss_config.ce_weight * ce + loss_config.latent_weight * latent, "val_ce": ce,
                "val_latent_loss": latent}
    return evaluate


def vision_flops(model_config: Any, batch: dict[str, Any]) -> float:
    """Forward FLOPs of the (frozen) vision tower on a host batch's video and imagery patches."""
    total = 0.0
    for prefix in ("video", "imagery"):
        patches = float(np.sum(batch[f"{prefix}_valid"]))
        # Qwen2.5-VL attends mostly within windows; a tower without them (Qwen3-VL) over each whole frame
        # (its size, or at most an example's rows when frames differ in size).
        span = None if hasattr(model_config.vision, "window_len") else (
            int(batch[f"{prefix}_frame_len"]) or batch[f"{prefix}_patches"].shape[1])
        total += patches * observe.vision_flops_per_patch(model_config, span)
    return total


def flops_fn(model_config: Any):
    """FLOPs of one training step on a host batch (text forward + backward, frozen vision forward)."""
    def flops(batch: dict[str, Any]) -> float:
        tokens = float(np.sum(batch["attention_mask"])) * jax.process_count()
        seq = batch["input_ids"].shape[1]
        return (tokens * observe.decoder_flops_per_token(model_config, seq)
                + vision_flops(model_config, batch) * jax.process_count())
    return flops


def train(settings: RunSettings, workdir: str | Path, data: str | None = None, steps: int | None = None,
          progress: bool = True) -> TrainState:
    """`fourd-jax dift`: train until global step `steps` (default optim.total_steps), resuming from
    the latest checkpoint in `workdir` if there is one."""
    return job.run(settings, workdir, make_trainer, data=data, steps=steps, progress=progress)
