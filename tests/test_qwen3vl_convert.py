"""Qwen3-VL HF <-> JAX conversion: bit-exact both ways, what `from_pretrained` loads, the published
configs' format, and the 2B/4B/8B parameter trees against transformers on the meta device."""

import jax
import numpy as np
import pytest
import torch
from meta_trees import assert_tree_matches_transformers
from qwen3vl_reference import build_hf_model, config_a, config_b
from safetensors.numpy import load_file
from transformers import Qwen3VLConfig as HFQwen3VLConfig
from transformers import Qwen3VLForConditionalGeneration

from fourd_jax import families, hf
from fourd_jax.convert.hf import CheckpointError, config_from_hf, config_to_hf
from fourd_jax.model.apply import init_params
from fourd_jax.model.qwen3vl import Qwen3VL
from fourd_jax.model.qwen3vl_config import PRESETS, Qwen3VLConfig, qwen3vl_2b, qwen3vl_4b, qwen3vl_8b


def load_in_transformers(directory) -> Qwen3VLForConditionalGeneration:
    model, info = Qwen3VLForConditionalGeneration.from_pretrained(directory, dtype=torch.float32,
                                                                  output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, problems
    return model.eval()


@pytest.mark.parametrize("make_config", [config_a, config_b])
def test_hf_to_jax_to_hf_is_bit_exact(make_config, tmp_path):
    build_hf_model(make_config(), seed=4).save_pretrained(tmp_path / "hf")
    model, params = hf.load(tmp_path / "hf")
    hf.save(model, params, tmp_path / "ours")
    original = load_file(tmp_path / "hf" / "model.safetensors")
    ours = load_file(tmp_path / "ours" / "model.safetensors")
    assert set(ours) == set(original)  # a tied checkpoint carries no lm_head.weight either way
    for name, tensor in original.items():
        assert ours[name].dtype == tensor.dtype and ours[name].shape == tensor.shape, name
        np.testing.assert_array_equal(ours[name], tensor, err_msg=name)
    reloaded = load_in_transformers(tmp_path / "ours")  # no missing or unexpected keys
    assert reloaded.config.tie_word_embeddings == model.config.tie_word_embeddings
    assert config_from_hf(reloaded.config.to_dict()) == model.config


def random_params(model, seed):
    """Every leaf random (init_params makes biases 0 and norms 1, which a swap would not show)."""
    leaves, tree = jax.tree_util.tree_flatten(init_params(model, jax.random.key(seed)))
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return tree.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)])


@pytest.mark.parametrize("make_config", [config_a, config_b])
def test_jax_to_hf_to_jax_is_bit_exact(make_config, tmp_path):
    model = Qwen3VL(make_config())
    params = random_params(model, 3)
    hf.save(model, params, tmp_path)
    model2, params2 = hf.load(tmp_path)
    assert model2.config == model.config
    assert jax.tree_util.tree_structure(params2) == jax.tree_util.tree_structure(params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)


def test_family_entry():
    family = families.for_hf_model_type("qwen3_vl")
    assert family is families.QWEN3_VL and family.module_type() is Qwen3VL
    assert families.family_of(config_a()) is family and families.family_of(Qwen3VL(config_a())) is family
    settings = family.processor
    assert (settings.patch_size, settings.merge_size, settings.temporal_patch_size) == (16, 2, 2)
    assert settings.image_mean == settings.image_std == (0.5, 0.5, 0.5)
    assert family.preset_table() is PRESETS


# The published Qwen/Qwen3-VL-8B-Instruct config.json in the layout transformers 4.57 wrote (rope in
# `rope_scaling` + `rope_theta`, token ids at both levels).
PUBLISHED_8B = {
    "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl", "image_token_id": 151655,
    "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "eos_token_id": 151645, "pad_token_id": 151643, "tie_word_embeddings": False,
    "text_config": {
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
        "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
        "intermediate_size": 12288, "max_position_embeddings": 262144, "model_type": "qwen3_vl_text",
        "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
        "rope_theta": 5000000, "use_cache": True, "vocab_size": 151936,
    },
    "vision_config": {
        "deepstack_visual_indexes": [8, 16, 24], "depth": 27, "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 1152, "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 4304,
        "model_type": "qwen3_vl", "num_heads": 16, "num_position_embeddings": 2304, "out_hidden_size": 4096,
        "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
    },
}


def test_published_config_layout_reads_as_the_8b_preset():
    config = config_from_hf(PUBLISHED_8B)
    assert isinstance(config, Qwen3VLConfig)
    assert config == qwen3vl_8b(pad_token_id=151643)
    assert config_from_hf(config_to_hf(config)) == config


def test_unsupported_settings_are_named():
    bad = dict(PUBLISHED_8B, text_config=dict(PUBLISHED_8B["text_config"], attention_bias=True))
    with pytest.raises(CheckpointError, match="attention_bias = true is not supported by fourd_jax's Qwen3-VL"):
        config_from_hf(bad, "x/config.json")
    bad = dict(PUBLISHED_8B, vision_config=dict(PUBLISHED_8B["vision_config"], deepstack_visual_indexes=[30]))
    with pytest.raises(CheckpointError, match="x/config.json: .*deepstack_visual_indexes"):
        config_from_hf(bad, "x/config.json")


@pytest.mark.parametrize("preset", [qwen3vl_2b, qwen3vl_4b, qwen3vl_8b])
def test_published_sizes_match_transformers_on_meta_device(preset):
    config = preset()
    total = assert_tree_matches_transformers(config, Qwen3VL(config), Qwen3VLForConditionalGeneration,
                                             HFQwen3VLConfig)
    # The published checkpoints' safetensors totals (the Hub's parameter counts of Qwen/Qwen3-VL-*-Instruct).
    assert total == {"qwen3vl_2b": 2_127_532_032, "qwen3vl_4b": 4_437_815_808,
                     "qwen3vl_8b": 8_767_123_696}[preset.__name__]
