"""LoRA: adapters on regex-chosen kernels, merging, training only the adapters (exact resume), and the
PEFT export that PyTorch `peft` loads with the logits we compute."""

import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from flax import traverse_util
from reference import Row, build_hf_model, config_b, hf_logits, make_batch
from run_configs import load_config, tiny_records

from fourd_jax import checkpoint, hf
from fourd_jax.batch import device_batch
from fourd_jax.cli import main
from fourd_jax.convert import peft as peft_export
from fourd_jax.data.pipeline import build_dataset
from fourd_jax.errors import InputError
from fourd_jax.load import load_model
from fourd_jax.model import lora
from fourd_jax.model.apply import forward
from fourd_jax.train import dift, loop
from fourd_jax.train import lora as train_lora
from fourd_jax.train.optim import trainable_mask
from fourd_jax.train.settings import RunSettings

# Every kind of linear kernel: stacked decoder projections (multi-axis inputs and outputs included),
# per-block vision projections, the merger and the untied LM head.
ALL_KINDS = r"(q_proj|v_proj|o_proj|down_proj|attn/qkv|attn/proj|mlp_0|lm_head)/kernel"


def with_random_adapters(model, params, targets=ALL_KINDS, rank=4, alpha=8.0, seed=1):
    """Adapters with A and B both random (fresh ones have B = 0 and change nothing)."""
    adapted = lora.add_adapters(params, model.config, lora.LoraSpec(rank=rank, alpha=alpha, targets=targets),
                                jax.random.key(seed))
    flat = traverse_util.flatten_dict(adapted, sep="/")
    keys = iter(jax.random.split(jax.random.key(seed + 1), len(flat)))
    for path in sorted(flat):
        if path.endswith(lora.B):
            flat[path] = 0.2 * jax.random.normal(next(keys), flat[path].shape)
    return traverse_util.unflatten_dict(flat, sep="/")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A random transformers model, our copy of it (untied head) and a batch with an image."""
    base_dir = tmp_path_factory.mktemp("base")
    build_hf_model(config_b(), seed=3).save_pretrained(base_dir)
    model, params = hf.load(base_dir)
    batch = make_batch(model.config, [Row([("text", 4), ("image", (1, 4, 8)), ("text", 5)]),
                                             Row([("text", 7), ("image", (1, 4, 4))])], seed=8)
    return base_dir, model, params, batch


def ours(model, params, batch):
    return np.asarray(forward(model, params, **{k: v for k, v in batch.items() if k != "mm_token_type_ids"}).logits)


def real(batch):
    return batch["attention_mask"].astype(bool)


def test_targets_choose_kernels_and_fresh_adapters_change_nothing(reference):
    _, model, params, batch = reference
    adapted = lora.add_adapters(params, model.config, lora.LoraSpec(rank=3, alpha=6.0, targets=r"layers/q_proj"),
                                jax.random.key(0))
    _, adapters = lora.split(adapted)
    assert sorted(adapters) == [f"language_model/layers/q_proj/{leaf}" for leaf in lora.LEAVES]
    assert adapters["language_model/layers/q_proj/lora_a"].shape == (3, 64, 3)  # [layers, in, r]
    assert adapters["language_model/layers/q_proj/lora_b"].shape == (3, 3, 4, 16)  # [layers, r, heads, head_dim]
    np.testing.assert_array_equal(adapters["language_model/layers/q_proj/lora_scale"], np.full(3, 2.0))
    np.testing.assert_array_equal(ours(model, adapted, batch), ours(model, params, batch))
    with pytest.raises(InputError, match="lora.targets 'nothing_here' matches no linear kernel"):
        lora.targeted(model.config, "nothing_here")
    with pytest.raises(InputError, match="not a valid regex"):
        lora.targeted(model.config, "(")
    frozen = r"lora.targets adapts visual/blocks_0/attn/qkv, which optim.freeze '\^visual/' freezes"
    with pytest.raises(InputError, match=frozen):
        train_lora.check_not_frozen(model.config, lora.LoraSpec(rank=2, targets="blocks_0/attn/qkv"), ("^visual/",))


def test_merged_forward_equals_the_adapted_forward(reference):
    _, model, params, batch = reference
    adapted = with_random_adapters(model, params)
    with_lora, base = ours(model, adapted, batch), ours(model, params, batch)
    assert np.abs(with_lora - base)[real(batch)].max() > 1e-2  # the adapters do change the model
    merged = lora.merge(adapted)
    assert not lora.split(merged)[1]
    np.testing.assert_allclose(ours(model, merged, batch)[real(batch)], with_lora[real(batch)], atol=2e-5, rtol=0)
    assert lora.spec_of(adapted).rank == 4 and lora.spec_of(adapted).alpha == pytest.approx(8.0)


def test_dropout_acts_only_inside_a_training_context_and_repeats_with_its_key(reference):
    _, model, params, batch = reference
    adapted = with_random_adapters(model, params, targets=r"layers/(q_proj|down_proj)/kernel")
    ids, mask = batch["input_ids"][:, :4], batch["attention_mask"][:, :4]  # text only

    def logits(rate, seed):
        with lora.dropout(rate, jax.random.key(seed)):
            return np.asarray(model.apply({"params": adapted}, ids, mask, rngs=lora.rngs()).logits)

    plain = np.asarray(model.apply({"params": adapted}, ids, mask).logits)
    np.testing.assert_array_equal(logits(0.0, 0), plain)
    assert np.abs(logits(0.5, 0) - plain).max() > 1e-3
    np.testing.assert_array_equal(logits(0.5, 0), logits(0.5, 0))
    assert np.abs(logits(0.5, 0) - logits(0.5, 1)).max() > 1e-3
    # The base alone (adapters removed) sees no dropout at all: it acts on the adapter path only.
    base = lora.split(adapted)[0]
    with lora.dropout(0.5, jax.random.key(0)):
        dropped = np.asarray(model.apply({"params": base}, ids, mask, rngs=lora.rngs()).logits)
    np.testing.assert_array_equal(dropped, np.asarray(model.apply({"params": base}, ids, mask).logits))


def test_peft_loads_the_adapter_export_and_transformers_the_merged_one(reference, tmp_path):
    peft = pytest.importorskip("peft")
    base_dir, model, params, batch = reference
    adapted = with_random_adapters(model, params)
    expected = ours(model, adapted, batch)

    out = peft_export.save_adapter(model, adapted, tmp_path / "adapter", str(base_dir))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert "model.language_model.layers.2.self_attn.q_proj" in config["target_modules"]
    base = build_hf_model(config_b(), seed=3)  # the same random base the fixture saved
    wrapped = peft.PeftModel.from_pretrained(base, str(out)).eval()
    got = hf_logits(wrapped, batch)
    assert np.abs(got - expected)[real(batch)].max() <= 1e-5

    # Read back as our adapter-only checkpoint: the same parameters.
    back = peft_export.load_adapter(model, params, out)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), back,
                           jax.device_get(adapted))

    hf.save(model, lora.merge(adapted), tmp_path / "merged")
    from transformers import Qwen2_5_VLForConditionalGeneration

    merged = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert np.abs(hf_logits(merged, batch) - expected)[real(batch)].max() <= 1e-5


def test_convert_cli_writes_the_adapter_and_the_merged_model(reference, tmp_path, capsys):
    base_dir, model, params, batch = reference
    adapted = with_random_adapters(model, params, targets=r"layers/(k_proj|up_proj)/kernel")
    checkpoint.save_params(tmp_path / "ckpt", model, adapted)
    assert main(["convert", "jax-to-hf", str(tmp_path / "ckpt"), str(tmp_path / "adapter"), "--adapter"]) == 0
    assert "wrote PEFT LoRA adapter" in capsys.readouterr().out
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "adapter" / "base").resolve())
    _, unadapted = hf.load(tmp_path / "adapter" / "base")
    jax.tree_util.tree_map(np.testing.assert_array_equal, unadapted, jax.device_get(params))
    back = peft_export.load_adapter(model, unadapted, tmp_path / "adapter")
    np.testing.assert_allclose(ours(model, back, batch), ours(model, adapted, batch), atol=1e-6)
    # Every loader (eval --checkpoint, model.init_from) takes the adapter directory: its base plus the adapter.
    loaded = load_model(tmp_path / "adapter")
    assert loaded.source.kind == "hf" and loaded.source.adapter == str(tmp_path / "adapter")
    np.testing.assert_allclose(ours(loaded.model, loaded.params, batch), ours(model, adapted, batch), atol=1e-6)

    assert main(["convert", "jax-to-hf", str(tmp_path / "ckpt"), str(tmp_path / "merged")]) == 0
    _, merged = hf.load(tmp_path / "merged")
    np.testing.assert_allclose(ours(model, merged, batch)[real(batch)],
                               ours(model, adapted, batch)[real(batch)], atol=2e-5)
    assert main(["convert", "jax-to-hf", str(tmp_path / "ckpt"), str(tmp_path / "x"), "--base-name", "b"]) == 2
    assert "--base-name goes with --adapter" in capsys.readouterr().err
    checkpoint.save_params(tmp_path / "plain", model, params)
    assert main(["convert", "jax-to-hf", str(tmp_path / "plain"), str(tmp_path / "y"), "--adapter"]) == 2
    assert "holds no LoRA adapters" in capsys.readouterr().err
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "base_model_name_or_path": "Qwen/x"}))
    with pytest.raises(InputError, match="is a LoRA adapter whose base_model_name_or_path 'Qwen/x' is no local"):
        load_model(tmp_path / "adapter")


@pytest.mark.parametrize("field, value, message", [
    ("lora.rank", -1, "lora.rank must be a whole number >= 0"),
    ("lora.alpha", 0.0, "lora.alpha must be a number > 0"),
    ("lora.dropout", 1.0, "lora.dropout must be below 1"),
    ("lora.targets", "(", "lora.targets '(' is not a valid regex"),
    ("lora.base_dtype", "int8", "lora.base_dtype must be one of"),
])
def test_lora_settings_are_checked_in_one_sentence(field, value, message):
    with pytest.raises(InputError, match=re.escape(message)):
        RunSettings.of(load_config("dift", **{"lora.rank": 4, field: value}))


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_records(tmp_path_factory.mktemp("lora_data"), seed=11)


def lora_config(data, **overrides):
    return load_config("dift", **{
        "data.seq_buckets": (512,), "train.checkpoint_every": 2, "tokenizer": str(data[0] / "tokenizer"),
        "lora.rank": 4, "lora.alpha": 8.0, "lora.dropout": 0.1, "lora.base_dtype": "bfloat16", "optim.lr": 1e-2,
        "train.eval_batches": 0,
        **overrides})


def test_lora_trains_only_the_adapters_and_resumes_bit_for_bit(data, tmp_path):
    path, tokenizer = data
    settings = RunSettings.of(lora_config(data))
    from fourd_jax import sharding

    mesh = sharding.make_mesh(settings.mesh_shape)
    trainer = dift.make_trainer(settings, tokenizer, mesh)
    # Adam's moments exist for the adapters' A and B only (the scalars are its step counts).
    moments = ["/".join(str(k.key) for k in p if hasattr(k, "key"))
               for p, leaf in jax.tree_util.tree_leaves_with_path(trainer.state.opt_state) if np.ndim(leaf)]
    adapters = [p for p in traverse_util.flatten_dict(trainer.state.params, sep="/") if p.endswith(lora.TRAINED)]
    assert len(moments) == 2 * len(adapters) > 0
    assert all(p.rsplit("/", 1)[-1] in lora.TRAINED for p in moments), moments
    # The step draws adapter dropout masks (and a run without dropout draws none).
    batch = next(iter(build_dataset(path / "train", tokenizer, trainer.model.config, settings.pipeline())))

    def random_draws(run_settings):
        trainable = trainable_mask(trainer.state.params, run_settings.optim.freeze)
        step = dift.jitted_train_step(run_settings, trainer.model, trainer.tx, trainable, trainer.shardings)
        with jax.set_mesh(mesh), nn.logical_axis_rules(run_settings.rules):
            traced = step.trace(trainer.state, device_batch(batch, mesh, run_settings.rules), None,
                                sizes=dift.StaticSizes.of(batch))
        return str(traced.jaxpr).count("random_bits")

    assert random_draws(settings) > 0 and random_draws(settings.replace(**{"lora.dropout": 0.0})) == 0

    flat = traverse_util.flatten_dict(trainer.state.params, sep="/")
    assert {v.dtype for p, v in flat.items() if not lora.is_adapter(p)} == {jnp.dtype(jnp.bfloat16)}
    assert {v.dtype for p, v in flat.items() if lora.is_adapter(p)} == {jnp.dtype(jnp.float32)}

    straight, split = tmp_path / "straight", tmp_path / "split"
    dift.train(settings, straight, data=str(path), steps=4, progress=False)
    dift.train(settings, split, data=str(path), steps=2, progress=False)
    dift.train(settings, split, data=str(path), steps=4, progress=False)
    rows = [[loop.without_timing(json.loads(line)) for line in (d / "metrics.jsonl").read_text().splitlines()]
            for d in (straight, split)]
    assert rows[0] == rows[1] and [r["step"] for r in rows[0]] == [1, 2, 3, 4]
    _, a = checkpoint.restore_params(straight / "checkpoints")
    _, b = checkpoint.restore_params(split / "checkpoints")
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)

    # Each step holds the adapters only; the frozen base is written once, beside the checkpoints.
    saved = ocp.StandardCheckpointHandler().metadata(straight / "checkpoints" / "4" / "params")
    assert sorted(traverse_util.flatten_dict(dict(saved), sep="/")) == sorted(
        p for p in flat if lora.is_adapter(p))
    _, base = checkpoint.restore_params(straight / train_lora.BASE_DIR)
    assert sorted(traverse_util.flatten_dict(base, sep="/")) == sorted(p for p in flat if not lora.is_adapter(p))
    # A run resuming on another base than the one its workdir holds is refused in one sentence.
    digest = straight / train_lora.BASE_DIR / train_lora.DIGEST_FILE
    digest.write_text(json.dumps({"digest": "0" * 64}))
    with pytest.raises(InputError, match=r"^model.preset 'tiny' holds other weights than the frozen base .* was "
                                         r"trained on \(.*lora_base\); resume with the same base"):
        dift.train(settings, straight, data=str(path), steps=5, progress=False)
    # Steps copied without their base are named in one sentence.
    (straight / train_lora.BASE_DIR).rename(tmp_path / "moved_base")
    with pytest.raises(checkpoint.CheckpointNotFound, match=r"^.*checkpoints step 4 holds LoRA adapters whose "
                                                             r"frozen base, .*lora_base, is missing; copy it with"):
        checkpoint.restore_params(straight / "checkpoints")

    # Only adapters moved: the base equals the initial one (as held, bf16), and B is no longer zero.
    before, after = traverse_util.flatten_dict(flat, sep="/"), traverse_util.flatten_dict(a, sep="/")
    for p, v in before.items():
        if not lora.is_adapter(p):
            np.testing.assert_array_equal(np.asarray(after[p], np.float32), np.asarray(v, np.float32), err_msg=p)
    assert np.abs(after["language_model/layers/q_proj/lora_b"]).max() > 0


def test_the_base_digest_ignores_sharding_and_adapters_and_sees_one_changed_element(reference):
    from fourd_jax import sharding
    from fourd_jax.model.apply import abstract_params

    _, model, params, _ = reference
    mesh = sharding.make_mesh((2, 4, 1))
    spread = sharding.place(params, sharding.param_shardings(abstract_params(model), mesh))
    digest = train_lora.base_digest(params)
    assert train_lora.base_digest(spread) == digest
    assert train_lora.base_digest(with_random_adapters(model, params)) == digest  # adapters are not the base
    flat = traverse_util.flatten_dict(params, sep="/")
    path = "language_model/layers/q_proj/kernel"
    flat[path] = flat[path].at[(0,) * flat[path].ndim].add(1e-3)
    assert train_lora.base_digest(traverse_util.unflatten_dict(flat, sep="/")) != digest
