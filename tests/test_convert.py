"""HF <-> JAX conversion: lossless both ways, sharded files, published sizes, clear errors."""

import dataclasses
import gc
import json
import shutil
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from meta_trees import assert_tree_matches_transformers
from reference import Row, build_hf_model, config_a, config_b, hf_logits, make_batch
from safetensors.numpy import load_file, save_file
from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from fourd_jax import hf
from fourd_jax.convert.hf import CheckpointError
from fourd_jax.data.latent_tokens import LATENT_TOKENS, latent_token_ids
from fourd_jax.data.tokenizer import build_tokenizer, config_for_tokenizer
from fourd_jax.model.apply import init_params
from fourd_jax.model.config import qwen25vl_3b, qwen25vl_7b
from fourd_jax.model.vlm import Qwen25VL


def load_in_transformers(directory):
    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        directory, dtype=torch.float32, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k != "error_msgs"}
    assert not problems, problems
    assert not info.get("error_msgs")
    return model.eval()


def batch_for(config):
    return make_batch(config, [Row([("text", 4), ("image", (1, 4, 8)), ("text", 5)])], seed=8)


def test_hf_to_jax_to_hf_gives_identical_logits(reference, tmp_path):
    _, torch_model, _, model, params = reference
    hf.save(model, params, tmp_path)
    reloaded = load_in_transformers(tmp_path)
    batch = batch_for(model.config)
    np.testing.assert_array_equal(hf_logits(reloaded, batch), hf_logits(torch_model, batch))


def random_params(model, seed):
    """Every leaf random (init_params makes biases 0 and norms 1, which a swap would not show)."""
    leaves, tree = jax.tree_util.tree_flatten(init_params(model, jax.random.key(seed)))
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return tree.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)])


def test_jax_to_hf_to_jax_gives_identical_params(tmp_path):
    model = Qwen25VL(dataclasses.replace(config_b(), mrope_text_start="spatial_extent"))
    params = random_params(model, 3)
    hf.save(model, params, tmp_path)
    model2, params2 = hf.load(tmp_path)
    assert model2.config == model.config  # the M-RoPE mode included
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)


def test_save_writes_the_tokenizer_and_a_latent_model_transformers_loads(tmp_path):
    tok = build_tokenizer(["the camera pans left, then the red ball moves toward the camera"] * 10,
                          vocab_size=300)
    model = Qwen25VL(config_for_tokenizer(tok, config_b()))
    params = random_params(model, 5)
    hf.save(model, params, tmp_path, tokenizer=tok)
    reloaded_tok = AutoTokenizer.from_pretrained(tmp_path)
    assert latent_token_ids(reloaded_tok) == latent_token_ids(tok) == model.config.latent_token_ids
    assert reloaded_tok.convert_ids_to_tokens(list(model.config.latent_token_ids)) == list(LATENT_TOKENS)
    text = "<|im_start|>user the camera<|latent_start|><|latent_pad|><|latent_end|><|im_end|>"
    assert reloaded_tok(text)["input_ids"] == tok(text)["input_ids"]
    load_in_transformers(tmp_path)
    model2, params2 = hf.load(tmp_path)
    assert model2.config == model.config
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)


def test_load_and_save_hold_at_most_one_host_copy(tmp_path):
    """hf.load reads tensor by tensor into one preallocated copy; hf.save materialises one shard
    at a time. tracemalloc sees numpy's host buffers (not XLA's device buffers)."""
    small = config_b()  # widened so that the fixed overhead of tracing is small beside the tensors
    model = Qwen25VL(dataclasses.replace(
        small, text=dataclasses.replace(small.text, hidden_size=512, intermediate_size=1024, num_heads=8,
                                        mrope_section=(16, 8, 8)),
        vision=dataclasses.replace(small.vision, out_hidden_size=512)))
    params = random_params(model, 7)
    total = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    hf.save(model, params, tmp_path / "one")
    gc.collect()
    tracemalloc.start()
    try:
        _, loaded = hf.load(tmp_path / "one")
        _, load_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        # What is still traced here depends on whether XLA aliased the loaded numpy buffers (it can when
        # they happen to be aligned), so the save is measured from this level, not from zero.
        before_save, _ = tracemalloc.get_traced_memory()
        hf.save(model, loaded, tmp_path / "sharded", max_shard_size=f"{total // 8}B")
        _, save_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert load_peak < 1.5 * total, (load_peak, total)  # two full copies would be >= 2x
    save_extra = save_peak - before_save
    assert save_extra < 0.6 * total, (save_extra, total)  # one 1/8 shard, its HF layout and encoding


def test_bfloat16_round_trip_and_sharded_files(reference, tmp_path):
    _, _, source, model, _ = reference
    model16, params16 = hf.load(source, dtype="bfloat16")
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree_util.tree_leaves(params16))
    hf.save(model16, params16, tmp_path, max_shard_size="100KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    load_in_transformers(tmp_path)
    _, again = hf.load(tmp_path, dtype="bfloat16")
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, params16)


@pytest.mark.parametrize("preset", [qwen25vl_3b, qwen25vl_7b])
def test_published_sizes_match_transformers_on_meta_device(preset):
    config = preset()
    total = assert_tree_matches_transformers(config, Qwen25VL(config), Qwen2_5_VLForConditionalGeneration,
                                             Qwen2_5_VLConfig)
    assert total == {"qwen25vl_3b": 3_754_622_976, "qwen25vl_7b": 8_292_166_656}[preset.__name__]


# ------------------------------------------------------------------ bad checkpoints


@pytest.fixture
def hf_dir(tmp_path):
    directory = tmp_path / "ckpt"
    build_hf_model(config_b()).save_pretrained(directory)
    return directory


def rewrite(directory, edit):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor_is_named(hf_dir):
    rewrite(hf_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        hf.load(hf_dir)


def test_unexpected_tensor_is_named(hf_dir):
    rewrite(hf_dir, lambda t: t.update({"model.layers.0.self_attn.rotary.inv_freq": np.ones(4, np.float32)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors has unexpected tensor "
                                              r"'model\.layers\.0\.self_attn\.rotary\.inv_freq'"):
        hf.load(hf_dir)


def test_wrong_shape_is_named(hf_dir):
    def shrink(t):
        t["visual.blocks.2.attn.qkv.weight"] = t["visual.blocks.2.attn.qkv.weight"][:-3]
    rewrite(hf_dir, shrink)
    with pytest.raises(CheckpointError, match=r"tensor 'visual\.blocks\.2\.attn\.qkv\.weight' has shape "
                                              r"\(93, 32\), but config\.json implies \(96, 32\)"):
        hf.load(hf_dir)


def test_other_architecture_is_refused(hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json describes model_type 'llama'.*only 'qwen2_5_vl'"):
        hf.load(hf_dir)


def test_directory_without_weights_is_refused(hf_dir):
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no safetensors weights"):
        hf.load(hf_dir)
    shutil.rmtree(hf_dir)
    with pytest.raises(CheckpointError, match="is not a directory"):
        hf.load(hf_dir)


def test_missing_config_and_params_mismatch_are_named(hf_dir, tmp_path):
    model, params = hf.load(hf_dir)
    (hf_dir / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json"):
        hf.load(hf_dir)
    bad = dict(params, language_model=dict(params["language_model"], norm={}))
    with pytest.raises(CheckpointError, match="missing parameter 'language_model/norm/weight'"):
        hf.save(model, bad, tmp_path / "out")


def test_tied_checkpoint_with_a_different_head_is_refused(tmp_path):
    model = build_hf_model(config_a())
    model.save_pretrained(tmp_path)
    rewrite(tmp_path, lambda t: t.update({"lm_head.weight": np.zeros_like(t["model.embed_tokens.weight"])}))
    with pytest.raises(CheckpointError, match="'lm_head.weight' that differs from the embedding"):
        hf.load(tmp_path)
