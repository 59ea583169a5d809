"""`fourd-jax compile`: the DIFT step, the GRPO update and the sampler compiled ahead of time for a
TPU slice (libtpu's description of v5e:2x2) on this CPU host, their per-device memory checked
against the state they hold, and the two refusals (does not fit; too much replicated) in one line."""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest
from run_configs import load_config, run_script

from fourd_jax import aot, sharding
from fourd_jax.errors import InputError
from fourd_jax.model.apply import abstract_params
from fourd_jax.train.optim import make_optimizer
from fourd_jax.train.settings import RunSettings
from fourd_jax.train.state import abstract_state, state_bytes_per_device, state_shardings


def error_lines(result) -> list[str]:
    """stderr without libtpu's start-up chatter (it logs through its own C++ logger)."""
    return [line for line in result.stderr.splitlines() if line.startswith("fourd-jax")]


def test_compile_dift_for_a_tpu_slice_reports_what_the_state_holds(tmp_path):
    report_file = tmp_path / "report.json"
    result = run_script(["compile", "--config", "dift:tiny", "--topology", "v5e-4", "--json", report_file])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "dift on v5e-4 (4 chips, mesh (data, fsdp, tensor) = (1, 4, 1)), global batch 8 x 1024 tokens" \
        in result.stdout
    assert ": fits" in result.stdout
    report = json.loads(report_file.read_text())
    assert (report["devices"], report["global_batch"], report["seq_len"]) == (4, 8, 1024)  # the largest bucket

    # The same state really created on 4 CPU devices: its shards' bytes per device.
    settings = RunSettings.of(load_config("dift", "tiny", **{"mesh.shape": (1, 4, 1)}))
    model, _ = aot.compile_model(settings)
    mesh = sharding.make_mesh((1, 4, 1), jax.devices()[:4])
    tx = make_optimizer(settings.optim, nn.meta.unbox(abstract_params(model)))
    abstract = abstract_state(state_shardings(model, tx, mesh, settings.rules), model, tx)
    real = jax.tree_util.tree_map(lambda a: jax.device_put(np.zeros(a.shape, a.dtype), a.sharding),
                                  (abstract.params, abstract.opt_state))
    held = state_bytes_per_device(abstract.replace(params=real[0], opt_state=real[1]))
    assert report["state_bytes"] == max(held.values())
    # The state is an argument, donated: the updated state is written over it (TPU tiles pad small arrays,
    # so XLA's byte counts are at least the logical ones).
    assert report["argument_bytes"] >= report["state_bytes"] and report["alias_bytes"] >= report["state_bytes"]
    assert report["peak_bytes"] == (report["argument_bytes"] + report["output_bytes"] - report["alias_bytes"]
                                    + report["temp_bytes"] + report["code_bytes"])
    assert 0 < report["replicated_fraction"] < 0.02  # only norms and biases stay whole
    assert report["xla_flops"] > 0
    assert report["step_seconds"] == pytest.approx(report["model_flops"] / (4 * 197e12 * 0.4))


def test_compile_refuses_a_program_that_does_not_fit_and_a_replicated_state(tmp_path):
    result = run_script(["compile", "--config", "dift:tiny", "--topology", "v5e-4", "--config.data.batch_size=16384"])
    assert result.returncode == 2
    (line,) = error_lines(result)
    assert line.startswith("fourd-jax compile: error: dift does not fit v5e-4 with mesh (1, 4, 1) and global batch "
                           "16384 x 1024 tokens:") and "HBM" in line
    result = run_script(["compile", "--config", "dift:tiny", "--topology", "v5e-4",
                         '--config.mesh.rules=(("embed", None), ("vocab", None))'])
    assert result.returncode == 2 and "fits" in result.stdout  # the report is printed, then refused
    (line,) = error_lines(result)
    assert "of the parameter and optimizer bytes are replicated on every device of v5e-4 (more than 2.0%)" in line
    result = run_script(["compile", "--config", "dift:tiny", "--topology", "v9-1"])
    assert result.returncode == 2
    (line,) = error_lines(result)
    assert line.startswith("fourd-jax compile: error: unknown TPU topology 'v9-1'; choose from [")


def test_compile_the_grpo_update_and_the_sampler():
    settings = RunSettings.of(load_config("rl", "tiny", **{"mesh.shape": (1, 4, 1), "data.batch_size": 4}))
    update = aot.compile_stage(settings, "rl", "v5e-4")
    sample = aot.compile_stage(settings, "sample", "v5e-4")
    for report in (update, sample):
        assert report.fits and report.global_batch == 4 and report.xla_flops > 0
    # Beside the sampler stay the optimizer state and the frozen reference policy (beta > 0): as many bytes as
    # the policy's parameters and optimizer state together; beside the update, the reference alone.
    assert settings.rl.beta > 0 and sample.resident_bytes == sample.state_bytes
    assert 0 < update.resident_bytes < update.state_bytes
    # The update's temporaries hold G sampled sequences of prompt + max_new_tokens per prompt.
    assert update.temp_bytes > sample.temp_bytes
    with pytest.raises(InputError, match="stage rl compiles the GRPO programs: pass an rl config"):
        aot.compile_stage(RunSettings.of(load_config("dift", "tiny")), "rl", "v5e-4")


def test_a_mesh_axis_that_splits_a_physical_axis():
    """v5p-128 is 4x4x4 chips; its preset (8, 8, 1) needs a physical axis split between two mesh axes."""
    mesh = sharding.make_mesh((8, 8, 1), aot.topology_devices("v5p-128"))
    assert dict(mesh.shape) == {"data": 8, "fsdp": 8, "tensor": 1}
    assert len({d.id for d in mesh.devices.flat}) == 64


def test_compile_the_tiny_qwen3vl_dift_step_and_grpo_programs():
    small = {"model.preset": "qwen3vl_tiny", "mesh.shape": (1, 4, 1), "data.max_frames": 4,
             "data.video_max_pixels": 64 * 64, "data.imagery_max_pixels": 64 * 64}
    report = aot.compile_stage(RunSettings.of(load_config("dift", "tiny", **small)), "dift", "v5e-4")
    assert report.fits and report.global_batch == 8 and report.xla_flops > 0
    rl_settings = RunSettings.of(load_config("rl", "tiny", **{**small, "data.batch_size": 4}))
    for stage in ("rl", "sample"):
        assert aot.compile_stage(rl_settings, stage, "v5e-4").fits
