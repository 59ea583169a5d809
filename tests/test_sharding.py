"""Logical axis names, the rules table and sharded parameters on 8 virtual CPU devices."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util
from reference import Row, make_batch

from fourd_jax import sharding
from fourd_jax.model.apply import abstract_params, forward, init_params
from fourd_jax.model.config import qwen25vl_7b, tiny
from fourd_jax.model.inputs import prepare_vision
from fourd_jax.model.positions import get_rope_index
from fourd_jax.model.vlm import Qwen25VL
from fourd_jax.train.settings import RunSettings


def test_every_parameter_has_logical_names_covered_by_the_rules():
    boxed = abstract_params(Qwen25VL(tiny()))
    specs = traverse_util.flatten_dict(nn.get_partition_spec(boxed))
    shapes = traverse_util.flatten_dict(nn.meta.unbox(boxed))
    known = {name for name, _ in sharding.DEFAULT_RULES}
    for key, spec in specs.items():
        assert len(spec) == len(shapes[key].shape), key
        assert all(name in known for name in spec if name is not None), (key, spec)
        assert any(name is not None for name in spec), key


def test_mesh_that_does_not_fit_the_devices_fails_clearly():
    assert jax.device_count() == 8
    with pytest.raises(sharding.ShardingError, match=r"needs 16 devices but 8 are available"):
        sharding.make_mesh((2, 2, 4))
    with pytest.raises(sharding.ShardingError, match="cannot fill 8 devices"):
        sharding.make_mesh((3, -1, 1))
    assert sharding.make_mesh((2, -1, 1)).shape == {"data": 2, "fsdp": 4, "tensor": 1}


def test_uneven_split_and_unmapped_names_fail_clearly():
    model = Qwen25VL(tiny())
    with pytest.raises(sharding.ShardingError, match=r"'language_model/layers/k_proj/bias' axis 1 "
                                                     r"\('kv_heads', size 2\) does not divide evenly"):
        init_params(model, jax.random.key(0), mesh=sharding.make_mesh((1, 1, 8)))
    rules = tuple(r for r in sharding.DEFAULT_RULES if r[0] != "mlp")
    with pytest.raises(sharding.ShardingError, match="logical axis 'mlp', which the rules table does not map"):
        init_params(model, jax.random.key(0), mesh=sharding.make_mesh((2, 2, 2)), rules=rules)


def test_a_config_can_remap_logical_names_and_bad_rules_fail_clearly():
    from jax.sharding import PartitionSpec as P
    from run_configs import load_config


    config = load_config("dift", **{"mesh.rules": (("mlp", ("fsdp", "tensor")), ("embed", None))})
    rules = RunSettings.of(config).rules
    assert dict(rules)["mlp"] == ("fsdp", "tensor") and dict(rules)["embed"] is None
    assert len(rules) == len(sharding.DEFAULT_RULES)
    model = Qwen25VL(tiny())
    shardings = sharding.param_shardings(abstract_params(model), sharding.make_mesh((1, 4, 2)), rules)
    up = shardings["language_model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert up.spec == P(None, None, ("fsdp", "tensor"))  # [layers, embed, mlp]
    assert RunSettings.of(load_config("dift")).rules == sharding.DEFAULT_RULES
    with pytest.raises(sharding.ShardingError, match="names logical axis 'hidden', which the model does not use"):
        sharding.resolve_rules([("hidden", "fsdp")])
    with pytest.raises(sharding.ShardingError, match="maps 'mlp' to 'model', which is not a mesh axis"):
        sharding.resolve_rules([("mlp", ("fsdp", "model"))])


def test_sharded_init_and_forward_equal_one_device():
    model = Qwen25VL(tiny())
    mesh = sharding.make_mesh((2, 2, 2))
    params = init_params(model, jax.random.key(0), mesh=mesh)
    single = init_params(model, jax.random.key(0))
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, single)
    kernel = params["language_model"]["layers"]["q_proj"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert kernel.addressable_shards[0].data.shape == (2, 32, 2, 16)
    assert sharding.replicated_fraction(params) < 0.01  # only norm scales are whole everywhere

    batch = make_batch(model.config, [Row([("text", 3), ("image", (1, 4, 8)), ("text", 5)])] * 4, seed=4)
    vision = prepare_vision(model.config, batch["pixel_values"], batch["image_grid_thw"])
    positions, _ = get_rope_index(model.config, batch["input_ids"], batch["image_grid_thw"])
    ref = forward(model, single, batch["input_ids"], pixel_values=batch["pixel_values"],
                  image_grid_thw=batch["image_grid_thw"]).logits

    def sharded_forward(p, ids, pos, vis):
        return model.apply({"params": p}, ids, position_ids=pos, vision=vis).logits

    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        ids = jax.device_put(batch["input_ids"], sharding.batch_sharding(mesh, 2))
        out = jax.jit(sharded_forward)(params, ids, positions, vision)
    assert out.sharding.spec[0] == ("data", "fsdp")
    assert np.abs(np.asarray(out) - np.asarray(ref)).max() <= 1e-5


def test_7b_parameters_are_shaped_without_allocating():
    boxed = abstract_params(Qwen25VL(qwen25vl_7b(param_dtype="bfloat16")))
    leaves = jax.tree_util.tree_leaves(nn.meta.unbox(boxed))
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
    assert sum(int(np.prod(leaf.shape)) for leaf in leaves) == 8_292_166_656
    mesh = sharding.make_mesh((1, 4, 2))
    shardings = sharding.param_shardings(boxed, mesh)
    embed = shardings["language_model"]["embed_tokens"]["embedding"]
    assert embed.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
