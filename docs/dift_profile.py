"""Where the DIFT step's time goes on this machine (docs/PERFORMANCE.md, "DIFT step profile").

    .venv/bin/python docs/dift_profile.py

`bench train` reports the whole step against the matmul peak. This script times the step's parts,
each its own jitted program on the bench's packed batch and weights, and sets each against its own
roof:

1. the frozen vision tower's forward (the video and the imagery targets): its FLOPs against the
   matmul peak at the tower's sizes;
2. the loss forward (vision + decoder + loss on the assistant positions);
3. the loss forward + backward (what the gradient costs);
4. the optimizer alone (global-norm clip, AdamW, the finiteness guard) on fixed gradients: no
   matmuls at all, so its roof is the bytes it must move (params, gradients and both Adam moments
   read; params and moments written) at the memory bandwidth measured now;
5. the whole step, as `bench train` times it.

Each figure is the median of 7 runs, with the spread. Parts 3 + 4 should add up to about part 5.
"""

from __future__ import annotations

import functools
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from fourd_jax import sharding  # noqa: E402
from fourd_jax.batch import device_batch  # noqa: E402
from fourd_jax.bench import roofline  # noqa: E402
from fourd_jax.bench.forward import latent_bench_config  # noqa: E402
from fourd_jax.bench.train import dift_batch  # noqa: E402
from fourd_jax.convert import hf  # noqa: E402
from fourd_jax.model.inputs import vision_inputs  # noqa: E402
from fourd_jax.train.dift import StaticSizes, loss_sums, train_step, vision_flops  # noqa: E402
from fourd_jax.train.observe import decoder_flops_per_token  # noqa: E402
from fourd_jax.train.optim import make_optimizer, stop_frozen, trainable_mask  # noqa: E402
from fourd_jax.train.settings import DiftLossConfig, OptimSettings  # noqa: E402
from fourd_jax.train.state import guarded_update, new_state  # noqa: E402

REPEATS = 7


def timed(name: str, fn, flops: float | None = None, peak: float | None = None) -> float:
    """Warm up, time, print one line; returns the median in s."""
    jax.block_until_ready(fn())
    runs = roofline.time_runs(lambda: jax.block_until_ready(fn()), REPEATS)
    line = f"  {name}: {runs.ms()}"
    if flops is not None:
        rate = flops / runs.median
        line += f", {flops / 1e9:.2f} GFLOP, {rate / 1e9:.1f} GFLOP/s"
        if peak:
            line += f" = {rate / peak:.0%} of the matmul peak"
    print(line)
    return runs.median


def main() -> None:
    import torch  # the bench's weights are written by transformers, as in `bench train`
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = latent_bench_config("small")
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(hf.config_to_hf(config))).save_pretrained(tmp)
        model, params = hf.load(tmp, attention_block=config.attention_block)
    host = dift_batch(config, packed=True)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    batch, sizes = device_batch(host, mesh, sharding.DEFAULT_RULES), StaticSizes.of(host)
    optim = OptimSettings(lr=1e-4, total_steps=10)
    tx = make_optimizer(optim, params)
    trainable = trainable_mask(params, optim.freeze)
    loss_config = DiftLossConfig()

    tokens, width = int(host["attention_mask"].sum()), host["input_ids"].shape[1]
    vision = vision_flops(config, host)
    forward = tokens * decoder_flops_per_token(config, width, trainable=False) + vision
    backward = tokens * decoder_flops_per_token(config, width, trainable=True) + vision
    t, vc = config.text, config.vision
    peaks = {"decoder": roofline.matmul_peak(width, t.hidden_size, t.intermediate_size)[0],
             "tower": roofline.matmul_peak(int(host["video_valid"].sum()), vc.hidden_size, vc.intermediate_size)[0]}
    print(f"DIFT step profile: small model, {tokens} tokens packed in one row of {width}; matmul peak "
          f"{peaks['decoder'] / 1e9:.1f} GFLOP/s at {width}x{t.hidden_size} @ {t.hidden_size}x{t.intermediate_size}, "
          f"{peaks['tower'] / 1e9:.1f} at the tower's {vc.hidden_size}x{vc.intermediate_size}")

    def tower(params):
        outs = []
        for prefix in ("video", "imagery"):
            inputs = vision_inputs({**batch, f"{prefix}_frame_len": getattr(sizes, f"{prefix}_frame_len")}, prefix)
            outs.append(model.apply({"params": params}, inputs, method="merged_tokens"))
        return outs

    def objective(params):
        sums = loss_sums(stop_frozen(params, trainable), batch, model, sizes)
        return (loss_config.ce_weight * sums["ce_sum"] / jnp.maximum(batch["loss_mask"].sum(), 1.0)
                + loss_config.latent_weight * sums["latent_sum"] / jnp.maximum(batch["latent_mask"].sum(), 1.0))

    tower_fn, forward_fn = jax.jit(tower), jax.jit(objective)
    grad_fn = jax.jit(jax.value_and_grad(objective))
    loss, grads = grad_fn(params)
    update_fn = jax.jit(lambda state: guarded_update(state, grads, loss, tx)[0], donate_argnums=0)
    step_fn = jax.jit(functools.partial(train_step, model=model, tx=tx, trainable=trainable, loss_config=loss_config),
                      static_argnames=("sizes",), donate_argnums=0)

    times = {}
    times["tower"] = timed("1. frozen vision tower (video + imagery)", lambda: tower_fn(params), vision,
                           peaks["tower"])
    times["forward"] = timed("2. loss forward (tower + decoder + loss)", lambda: forward_fn(params), forward,
                             peaks["decoder"])
    times["grad"] = timed("3. loss forward + backward", lambda: grad_fn(params), backward, peaks["decoder"])

    holder = {"state": new_state(jax.tree_util.tree_map(jnp.copy, params), tx, 0)}

    def update():
        holder["state"] = update_fn(holder["state"])
        return holder["state"].params

    times["update"] = timed("4. optimizer update alone (clip + AdamW + guard)", update)
    moved = {"trainable": 0, "frozen": 0}
    for leaf, train in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(trainable), strict=True):
        moved["trainable" if train else "frozen"] += leaf.nbytes
    # Trainable: read params, grads, m, v; write params, m, v. Frozen: the zero update still reads and
    # writes the params (optax.apply_updates adds it), and reads its zero gradient.
    traffic = 7 * moved["trainable"] + 3 * moved["frozen"]
    # The roof of elementwise work: a jitted a + b over arrays as large as the trainable params
    # (two read, one written), measured now.
    a = jnp.ones(moved["trainable"] // 4, jnp.float32)
    add = jax.jit(jnp.add)
    add_s = roofline.time_runs(lambda: jax.block_until_ready(add(a, a)), REPEATS).median
    bandwidth = 3 * a.nbytes / add_s
    print(f"     moves at least {traffic / 1e6:.0f} MB ({moved['trainable'] / 1e6:.0f} MB trainable, "
          f"{moved['frozen'] / 1e6:.0f} MB frozen params): {traffic / times['update'] / 1e9:.1f} GB/s, against "
          f"{bandwidth / 1e9:.1f} GB/s for a jitted a + b of the trainable params' size, measured now")

    # Placed on the mesh as the step returns it, so the step compiles once.
    holder["step"] = jax.device_put(new_state(jax.tree_util.tree_map(jnp.copy, params), tx, 0),
                                    jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

    def step():
        holder["step"], metrics = step_fn(holder["step"], batch, sizes=sizes)
        return metrics["loss"]

    times["step"] = timed("5. the whole step", step, backward, peaks["decoder"])
    print(f"  3 + 4 = {(times['grad'] + times['update']) * 1e3:.1f} ms against the step's {times['step'] * 1e3:.1f}; "
          f"the step's FLOPs at the decoder's matmul peak would take {backward / peaks['decoder'] * 1e3:.1f} ms")
    decoder_fwd = times["forward"] - times["tower"]
    decoder_bwd = times["grad"] - times["forward"]
    print(f"  by difference: decoder forward + loss {decoder_fwd * 1e3:.1f} ms "
          f"({(forward - vision) / decoder_fwd / peaks['decoder']:.0%} of peak), its backward "
          f"{decoder_bwd * 1e3:.1f} ms ({(backward - forward) / decoder_bwd / peaks['decoder']:.0%} of peak), "
          f"tower {times['tower'] * 1e3:.1f} ms, optimizer {times['update'] * 1e3:.1f} ms")
    print(f"  shares of the step: tower {times['tower'] / times['step']:.0%}, decoder forward "
          f"{decoder_fwd / times['step']:.0%}, backward {decoder_bwd / times['step']:.0%}, optimizer "
          f"{times['update'] / times['step']:.0%}")


if __name__ == "__main__":
    main()
