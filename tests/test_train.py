"""DIFT training: mesh equivalence, memory per device, accumulation, non-finite guard, exact resume,
checkpoints (restore onto another mesh, kill during save, SIGTERM), multi-process equality."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from run_configs import load_config, tiny_records

from fourd_jax import sharding
from fourd_jax.data.pipeline import build_dataset
from fourd_jax.errors import InputError
from fourd_jax.train import dift, loop
from fourd_jax.train.checkpoints import Checkpointer
from fourd_jax.train.settings import RunSettings
from fourd_jax.train.state import abstract_state, state_bytes_per_device

REPO = Path(__file__).parents[1]


def dift_config(**overrides):
    return load_config("dift", **{"data.seq_buckets": (1024,), "train.checkpoint_every": 3, **overrides})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_records(tmp_path_factory.mktemp("dift_data"), seed=5)


def host_batches(config, data, n):
    """n copies of one batch that has imagery latents (one batch shape: the step compiles once)."""
    path, tokenizer = data
    from fourd_jax.data.tokenizer import config_for_tokenizer
    from fourd_jax.model.config import PRESETS

    model_config = config_for_tokenizer(tokenizer, PRESETS[config.model.preset]())
    it = iter(build_dataset(path / "train", tokenizer, model_config, RunSettings.of(config).pipeline()))
    batch = next(b for b in it if b["latent_mask"].any())
    return [batch] * n


def run_steps(config, data, mesh, batches, metric="loss"):
    trainer = dift.make_trainer(RunSettings.of(config), data[1], mesh)
    state, values = trainer.state, []
    for batch in batches:
        state, metrics = trainer.step_fn(state, batch)
        values.append(float(metrics[metric]))
    return state, values, trainer


@pytest.fixture(scope="module")
def one_device_run(data):
    """(config, batches, final state, losses) of 3 DIFT steps on one device: what every mesh must give.
    512-token rows: a (1, 1, 8) mesh holds the whole batch on every device, 1.5 GB of temporaries each
    at 1024 tokens (15 GB in all, too much beside a second test worker) and 0.4 GB at 512."""
    config = dift_config(**{"model.preset": "tiny8", "optim.warmup_steps": 1, "data.seq_buckets": (512,)})
    batches = host_batches(config, data, 3)
    reference, ref_losses, _ = run_steps(config, data, sharding.make_mesh((1, 1, 1), jax.devices()[:1]), batches)
    assert all(np.isfinite(ref_losses))
    return config, batches, reference, ref_losses


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)])
def test_meshes_give_the_losses_and_params_of_one_device(one_device_run, data, shape):
    config, batches, reference, ref_losses = one_device_run
    state, losses, _ = run_steps(config, data, sharding.make_mesh(shape), batches)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    # Adam moves a parameter by up to lr per step whatever its gradient's size, so a near-zero
    # gradient whose last bits differ with the reduction order can move it a fraction of lr.
    for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(reference.params),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=0.1 * config.optim.lr)


def test_logits_at_the_loss_positions_give_the_full_cross_entropy(data):
    import functools

    from fourd_jax.data.tokenizer import config_for_tokenizer
    from fourd_jax.model.apply import init_params
    from fourd_jax.model.config import PRESETS
    from fourd_jax.model.vlm import Qwen25VL

    config = dift_config()
    (batch,) = host_batches(config, data, 1)
    model = Qwen25VL(config_for_tokenizer(data[1], PRESETS[config.model.preset]()))
    params = init_params(model, jax.random.key(0))
    arrays = {k: v for k, v in batch.items() if isinstance(v, np.ndarray) and v.dtype != object and v.ndim}
    sizes = dift.StaticSizes.of(batch)
    length = batch["input_ids"].shape[1]
    assert batch["loss_positions"].shape[1] < length / 2  # the assistant turns, not the whole sequence

    @functools.partial(jax.jit, static_argnames="sizes")
    def sums(arrays, sizes):
        out, _ = dift.teacher_forced(params, arrays, model, sizes)
        full = jnp.sum(dift.token_cross_entropy(out.logits, arrays["targets"]) * arrays["loss_mask"])
        return dift.loss_sums(params, arrays, model, sizes)["ce_sum"], full

    selected, full = sums(arrays, sizes)
    # Every position of every row selected: the same sum.
    everywhere = np.broadcast_to(np.arange(length, dtype=np.int32), batch["loss_positions"].shape[:1] + (length,))
    whole, _ = sums({**arrays, "loss_positions": everywhere}, sizes)
    assert float(full) > 0
    np.testing.assert_allclose([float(selected), float(whole)], float(full), rtol=1e-6)


def test_fsdp_8_holds_an_eighth_of_the_state_per_device(data):
    config = dift_config(**{"model.preset": "tiny8"})
    trainer = dift.make_trainer(RunSettings.of(config), data[1], sharding.make_mesh((1, 8, 1)))
    held = state_bytes_per_device(trainer.state)
    total = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves((trainer.state.params, trainer.state.opt_state)))
    assert len(held) == 8
    assert max(held.values()) <= 1.15 * total / 8, (max(held.values()), total / 8)


def test_gradient_accumulation_equals_the_full_batch(data):
    config = dift_config()
    batches = host_batches(config, data, 2)
    mesh = sharding.make_mesh((1, 2, 1), jax.devices()[:2])
    full, full_norms, _ = run_steps(config, data, mesh, batches, metric="grad_norm")
    config.optim.grad_accum = 2
    accumulated, acc_norms, _ = run_steps(config, data, mesh, batches, metric="grad_norm")
    # Adam is blind to the gradient's scale, so the gradient norm is what shows a wrong mean.
    np.testing.assert_allclose(acc_norms, full_norms, rtol=1e-5)
    # As on other meshes: a near-zero gradient whose last bits differ with the summation order can
    # move its parameter by a fraction of lr, so parameters agree to a fraction of lr, not to ulps.
    for a, b in zip(jax.tree_util.tree_leaves(accumulated.params), jax.tree_util.tree_leaves(full.params),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=0.1 * config.optim.lr)


def test_non_finite_steps_leave_the_state_and_stop_training(data, tmp_path):
    config = dift_config()
    batches = host_batches(config, data, 3)
    trainer = dift.make_trainer(RunSettings.of(config), data[1], sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
    params = trainer.state.params
    poisoned = dict(params, language_model=dict(params["language_model"], norm={
        "weight": params["language_model"]["norm"]["weight"] * np.nan}))
    state = trainer.state.replace(params=poisoned)
    before = jax.tree_util.tree_map(np.asarray, (state.params, state.opt_state))
    state, metrics = trainer.step_fn(state, batches[0])
    assert not bool(metrics["finite"]) and int(state.nonfinite_streak) == 1 and int(state.step) == 1
    after = jax.tree_util.tree_map(np.asarray, (state.params, state.opt_state))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), after, before)
    checkpointer = Checkpointer(tmp_path / "ckpt")
    with pytest.raises(loop.NonFiniteError, match="2 consecutive steps had a non-finite loss"):
        loop.run(state=state, step_fn=trainer.step_fn, batches=iter(batches[1:]), checkpointer=checkpointer,
                 metrics=_NoMetrics(), total_steps=10, config={}, model_config={}, schedule=trainer.schedule,
                 flops_fn=lambda b: 0.0, checkpoint_every=100, max_nonfinite=2, progress=False)
    checkpointer.close()


class _NoMetrics:
    def write(self, step, metrics):
        pass


def test_resume_continues_bit_for_bit_and_restores_onto_another_mesh(data, tmp_path):
    path, _ = data
    config = dift_config(**{"tokenizer": str(path / "tokenizer")})
    straight, split = tmp_path / "straight", tmp_path / "split"
    dift.train(RunSettings.of(config), straight, data=str(path), steps=6, progress=False)
    dift.train(RunSettings.of(config), split, data=str(path), steps=3, progress=False)
    dift.train(RunSettings.of(config), split, data=str(path), steps=6, progress=False)
    rows = [[loop.without_timing(json.loads(line)) for line in (d / "metrics.jsonl").read_text().splitlines()]
            for d in (straight, split)]
    assert rows[0] == rows[1] and [r["step"] for r in rows[0]] == list(range(1, 7))
    assert [r["step"] for r in rows[0] if "val_loss" in r] == [3, 6]  # validated at each checkpoint
    from fourd_jax import checkpoint

    _, a = checkpoint.restore_params(straight / "checkpoints")
    _, b = checkpoint.restore_params(split / "checkpoints")
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    manifest = json.loads((straight / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["mesh_shape"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert all(len(h) == 64 for h in manifest["data_files"].values())

    # The same checkpoint onto a (2, 2, 2) mesh: identical values, new placement.
    other = sharding.make_mesh((2, 2, 2))
    trainer = dift.make_trainer(RunSettings.of(dift_config(**{"tokenizer": str(path / "tokenizer")})), data[1], other)
    batches = iter(build_dataset(path / "train", data[1], trainer.model.config, RunSettings.of(config).pipeline()))
    restored = Checkpointer(straight / "checkpoints").restore(
        abstract_state(trainer.shardings, trainer.model, trainer.tx), batches)
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored.params, a)
    kernel = restored.params["language_model"]["layers"]["mlp"]["gate_proj"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert int(restored.step) == 6


def test_a_damaged_latest_checkpoint_is_skipped_and_the_run_continues_exactly(data, tmp_path, capsys):
    """The latest of three checkpoints loses a params chunk: the run says so in one line, resumes from
    the one before with the losses of an uninterrupted run, and rewrites the damaged step. eval and
    convert name a damaged step; a step without its data-iterator file is skipped as well."""
    from fourd_jax import checkpoint

    path, _ = data
    config = dift_config(**{"tokenizer": str(path / "tokenizer"), "train.checkpoint_every": 2})
    straight, damaged = tmp_path / "straight", tmp_path / "damaged"
    dift.train(RunSettings.of(config), straight, data=str(path), steps=8, progress=False)
    dift.train(RunSettings.of(config), damaged, data=str(path), steps=6, progress=False)
    ckpt = damaged / "checkpoints"
    assert sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) == [2, 4, 6]
    chunks = sorted(p for p in (ckpt / "6" / "params").rglob("*") if p.is_file() and p.parent.name == "d")
    assert chunks
    chunks[0].unlink()
    with pytest.raises(InputError, match=f"^{ckpt} step 6 does not restore \\("):
        checkpoint.restore_params(ckpt)  # what eval and convert load through
    capsys.readouterr()
    dift.train(RunSettings.of(config), damaged, data=str(path), steps=8, progress=False)
    err = [line for line in capsys.readouterr().err.splitlines() if "checkpoint step" in line]
    assert len(err) == 1 and err[0].startswith(f"checkpoint step 6 in {ckpt} does not restore (")
    assert err[0].endswith("); resuming from an earlier step.")
    assert f'at local file "{ckpt / "6" / "params"}/"' in err[0]  # tensorstore's words: which tensor, which file
    rows = [[loop.without_timing(json.loads(line)) for line in (d / "metrics.jsonl").read_text().splitlines()]
            for d in (straight, damaged)]
    assert rows[0] == rows[1] and [r["step"] for r in rows[1]] == list(range(1, 9))
    _, a = checkpoint.restore_params(straight / "checkpoints", step=6)
    _, b = checkpoint.restore_params(ckpt, step=6)  # step 6 written anew
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    # A step whose data-iterator file is gone is skipped too; with none left, one sentence.
    (ckpt / "8" / "data" / "process_0-of-1.json").unlink()
    capsys.readouterr()
    dift.train(RunSettings.of(config), damaged, data=str(path), steps=8, progress=False)
    assert "checkpoint step 8 in" in capsys.readouterr().err
    for step in (4, 6, 8):
        (ckpt / str(step) / "data" / "process_0-of-1.json").unlink(missing_ok=True)
    with pytest.raises(InputError, match=f"^no checkpoint in {ckpt} restores \\(step 8: .*; step 6: .*; step 4: "):
        dift.train(RunSettings.of(config), damaged, data=str(path), steps=9, progress=False)


def test_retention_keeps_the_last_and_the_best_checkpoint(tmp_path):
    import grain

    from fourd_jax.train.state import TrainState

    iterator = iter(grain.MapDataset.range(100).to_iter_dataset())
    checkpointer = Checkpointer(tmp_path, keep=2, best_metric="val_loss")
    for step, metric in zip(range(1, 7), [5.0, 1.0, 4.0, 3.0, 6.0, 7.0], strict=True):
        state = TrainState(step=np.int32(step), params={"w": np.full(3, step, np.float32)}, opt_state={},
                           rng=np.zeros(2, np.uint32), nonfinite_streak=np.int32(0), nonfinite_total=np.int32(0))
        next(iterator)
        checkpointer.save(state, iterator, {}, {}, metric=metric, wait=True)
    assert sorted(checkpointer.manager.all_steps()) == [2, 5, 6]  # best (1.0 at step 2) and the last two
    checkpointer.close()


def test_a_mesh_that_does_not_fit_is_one_sentence(data, tmp_path):
    config = dift_config(**{"mesh.shape": (3, 1, 1)})
    with pytest.raises(InputError, match=r"mesh_shape \(3, 1, 1\) needs 3 devices but 8 are available"):
        dift.train(RunSettings.of(config), tmp_path, data=str(data[0]), steps=1, progress=False)


# ----------------------------------------------------------------------------- processes


def cli_env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    return env


def dift_cmd(workdir, data, steps, *extra):
    return [sys.executable, "-m", "fourd_jax.cli", "dift", "--workdir", str(workdir), "--data", str(data[0]),
            "--steps", str(steps), "--config=dift:tiny",
            f"--config.tokenizer={data[0] / 'tokenizer'}", "--config.data.seq_buckets=(1024,)", *extra]


def test_sigterm_saves_at_the_next_step_and_exits_zero(data, tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.Popen(dift_cmd(workdir, data, 500), env=cli_env(1), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-2000:]
    last = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert 2 <= last < 500
    assert Checkpointer(workdir / "checkpoints").latest_step() == last
    assert f"stopped by SIGTERM at step {last}; checkpoint saved." in out.splitlines()
    # The next run says where it picks up.
    resumed = subprocess.run(dift_cmd(workdir, data, last + 1), env=cli_env(1), cwd=REPO, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from step {last}" in resumed.stdout.splitlines()


def test_a_process_killed_during_a_save_leaves_the_previous_checkpoint(data, tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO / 'tests')!r})
        import jax, numpy as np
        from test_train import dift_config, host_batches
        from fourd_jax import sharding
        from fourd_jax.data.pipeline import build_dataset
        from fourd_jax.train import dift, job
        from fourd_jax.train.checkpoints import Checkpointer
        from fourd_jax.train.settings import RunSettings
        from transformers import AutoTokenizer
        path = {str(data[0])!r}
        tok = AutoTokenizer.from_pretrained(path + "/tokenizer")
        config = dift_config()
        trainer = dift.make_trainer(RunSettings.of(config), tok, sharding.make_mesh((1, 1, 1)))
        it = iter(build_dataset(path + "/train", tok, trainer.model.config, RunSettings.of(config).pipeline()))
        ckpt = Checkpointer({str(tmp_path / 'ckpt')!r})
        state, _ = trainer.step_fn(trainer.state, next(it))
        ckpt.save(state, it, {{}}, trainer.model.config.to_dict(), wait=True)
        state, _ = trainer.step_fn(state, next(it))
        ckpt.save(state, it, {{}}, trainer.model.config.to_dict())  # asynchronous: still writing
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=cli_env(1), cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    checkpointer = Checkpointer(tmp_path / "ckpt")
    assert checkpointer.latest_step() == 1
    from fourd_jax import checkpoint

    model, params = checkpoint.restore_params(tmp_path / "ckpt")
    assert np.isfinite(np.asarray(params["language_model"]["norm"]["weight"])).all()


def test_two_processes_give_the_loss_of_one(data, tmp_path):
    import portpicker

    port = portpicker.pick_unused_port()
    single = subprocess.Popen(dift_cmd(tmp_path / "one", data, 2), env=cli_env(4), cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cluster = [f"--config.distributed.coordinator=127.0.0.1:{port}", "--config.distributed.num_processes=2"]
    pair = [subprocess.Popen(dift_cmd(tmp_path / "two", data, 2, *cluster, f"--config.distributed.process_id={i}"),
                             env=cli_env(2), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)]
    for proc in [single, *pair]:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    one = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(two) == 2  # written once (by process 0), not once per process
    assert Checkpointer(tmp_path / "two" / "checkpoints").latest_step() == 2
    for a, b in zip(one, two, strict=True):
        assert a["tokens"] == b["tokens"] and a["ce_tokens"] == b["ce_tokens"]
        np.testing.assert_allclose([b["loss"], b["ce"], b["latent_loss"]], [a["loss"], a["ce"], a["latent_loss"]],
                                   rtol=2e-5)
    # Validation at the last step: each process reads its own shard of val, stepped through together.
    np.testing.assert_allclose([two[-1][k] for k in ("val_loss", "val_ce", "val_latent_loss")],
                               [one[-1][k] for k in ("val_loss", "val_ce", "val_latent_loss")], rtol=1e-4)


def test_config_presets_describe_the_published_recipes():
    from fourd_jax.configs import dift as module
    from fourd_jax.model.config import PRESETS

    for preset in ("qwen25vl_3b", "qwen25vl_7b"):
        c = module.get_config(f"{preset},v5p-64")
        assert c.model.preset in PRESETS and c.mesh.shape == (4, 8, 1)
        assert (c.optim.lr, c.optim.weight_decay, c.optim.warmup_steps, c.data.batch_size) == (1e-5, 0.01, 10, 8)
        assert (c.loss.ce_weight, c.loss.latent_weight, c.model.dtype) == (0.1, 1.0, "bfloat16")
        assert c.optim.freeze == (r"^visual/",) and c.data.video_max_pixels == 256 * 28 * 28
    assert module.get_config("tiny,8xh100").mesh.shape == (1, 8, 1)
    with pytest.raises(InputError, match="unknown mesh preset 'v9'"):
        module.get_config("tiny,v9")


def test_precomputed_imagery_targets_give_the_in_step_loss(data, tmp_path, capsys):
    """Targets written into the records by the starting checkpoint's frozen tower train the same."""
    from fourd_jax import checkpoint, cli

    path, tokenizer = data
    config = dift_config(**{"optim.warmup_steps": 0})
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    trainer = dift.make_trainer(RunSettings.of(config), tokenizer, mesh)
    checkpoint.save_params(tmp_path / "start", trainer.model, trainer.state.params)
    assert cli.main(["data", "targets", str(path), "--checkpoint", str(tmp_path / "start"), "--out",
                     str(tmp_path / "with_targets"), "--imagery-max-pixels", str(config.data.imagery_max_pixels)]) == 0
    assert "imagery targets for" in capsys.readouterr().out

    in_step = host_batches(config, data, 1)[0]
    config_pre = dift_config(**{"optim.warmup_steps": 0, "loss.imagery_targets": "precomputed",
                                "model.init_from": str(tmp_path / "start")})
    pre = dift.make_trainer(RunSettings.of(config_pre), tokenizer, mesh)
    pipeline = RunSettings.of(config_pre).pipeline()
    batches = build_dataset(tmp_path / "with_targets" / "train", tokenizer, pre.model.config, pipeline)
    wanted = list(in_step["sample_id"])
    batch = next(b for b in batches if list(b["sample_id"]) == wanted)
    assert "latent_targets" in batch and not batch["imagery_valid"].any()  # no imagery pixels in the batch
    _, a = trainer.step_fn(trainer.state, in_step)
    _, b = pre.step_fn(pre.state, batch)
    np.testing.assert_allclose([float(b["loss"]), float(b["latent_loss"])], [float(a["loss"]), float(a["latent_loss"])],
                               rtol=1e-5)
    with pytest.raises(InputError,
                       match=r"loss.imagery_targets must be one of \('in_step', 'precomputed'\), not 'cached'"):
        RunSettings.of(dift_config(**{"loss.imagery_targets": "cached"})).pipeline()


def test_remat_blockwise_attention_and_bfloat16_compute_train_the_same_model(data):
    """Rematerialisation and attention blocks change memory, not numbers; bf16 compute keeps fp32
    master weights."""
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    batch = host_batches(dift_config(), data, 1)
    _, base, _ = run_steps(dift_config(), data, mesh, batch * 2)
    _, remat, _ = run_steps(dift_config(**{"model.remat_policy": "nothing_saveable"}), data, mesh, batch * 2)
    np.testing.assert_allclose(remat, base, rtol=1e-6)
    trainer = dift.make_trainer(RunSettings.of(dift_config(**{"model.attention_block": 128})), data[1], mesh)
    assert trainer.model.config.attention_block == 128 < batch[0]["input_ids"].shape[1]
    _, blocks, _ = run_steps(dift_config(**{"model.attention_block": 128}), data, mesh, batch * 2)
    np.testing.assert_allclose(blocks, base, rtol=1e-5)
    state, low, _ = run_steps(dift_config(**{"model.dtype": "bfloat16"}), data, mesh, batch * 2)
    assert all(leaf.dtype == np.float32 for leaf in jax.tree_util.tree_leaves(state.params))
    np.testing.assert_allclose(low, base, rtol=0.05)
    assert low != base


def test_the_progress_bar_shows_the_loss_terms_lr_and_tokens_per_second():
    dift_row = {"loss": 1.0, "ce": 2.0, "latent_loss": 0.5, "lr": 1e-3, "tokens_per_s": 1234.4, "tokens": 5.0}
    assert loop.progress_fields(dift_row) == {"loss": "1.0000", "ce": "2.0000", "latent": "0.5000", "lr": "1.00e-03",
                                              "tok/s": "1234"}
    rl_row = {"loss": -0.1, "reward": 0.75, "lr": 1e-6, "tokens_per_s": 10.0}
    assert loop.progress_fields(rl_row) == {"loss": "-0.1000", "reward": "0.7500", "lr": "1.00e-06", "tok/s": "10"}


def test_packed_rows_give_the_losses_and_update_of_one_example_per_row(data):
    """The same 8 examples packed into 2 rows train exactly as in 8 rows: per-segment attention,
    M-RoPE positions, media, imagery targets and loss positions."""
    from fourd_jax.data.batching import pack

    assert sorted(i for row in pack([5, 9, 3, 7, 1], 2) for i in row) == list(range(5))
    # 9 | 7; 5 joins the 7 (12); 3 joins the 9 (12); 1 goes to the first of the tied rows (13)
    assert pack([5, 9, 3, 7, 1], 2) == [[1, 2, 4], [0, 3]]
    buckets = {"data.seq_buckets": tuple(range(128, 4097, 128))}  # packing pays with fine buckets
    one_per_row, packed = dift_config(**buckets), dift_config(**buckets, **{"data.packed_rows": 2})
    plain, = host_batches(one_per_row, data, 1)
    dense, = host_batches(packed, data, 1)
    assert dense["input_ids"].shape[0] == 2 and plain["input_ids"].shape[0] == 8
    assert dense["input_ids"].size < plain["input_ids"].size  # fewer token slots for the same tokens
    assert int(dense["attention_mask"].sum()) == int(plain["attention_mask"].sum())
    assert dense["segment_ids"].max() > 1
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    results = []
    for config, batch in ((one_per_row, plain), (packed, dense)):
        trainer = dift.make_trainer(RunSettings.of(config), data[1], mesh)
        state, metrics = trainer.step_fn(trainer.state, batch)
        results.append((jax.device_get(metrics), jax.device_get(state.params)))
    (m_plain, p_plain), (m_packed, p_packed) = results
    assert m_plain["latent_targets"] > 0 and m_plain["ce_tokens"] == m_packed["ce_tokens"]
    for key in ("loss", "ce", "latent_loss", "grad_norm"):
        # measured: <= 1.2e-7 relative; attention across segments moves the loss by 5e-5
        np.testing.assert_allclose(float(m_packed[key]), float(m_plain[key]), rtol=1e-6, err_msg=key)
    for a, b in zip(jax.tree_util.tree_leaves(p_packed), jax.tree_util.tree_leaves(p_plain), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
