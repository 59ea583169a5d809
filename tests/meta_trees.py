"""Our parameter tree (by `jax.eval_shape`) against a `transformers` model built on the meta device."""

from __future__ import annotations

import flax.linen as nn
import numpy as np
import torch
from flax import traverse_util

from fourd_jax.convert.hf import canonical_name, config_to_hf, hf_shape, tensor_slots
from fourd_jax.model.apply import abstract_params


def assert_tree_matches_transformers(config, module, hf_model_type, hf_config_type) -> int:
    """Assert that `module`'s parameters are exactly the HF model's tensors after conversion (same
    names, shapes and count; each parameter layer one tensor); return the parameter count."""
    with torch.device("meta"):
        ref = hf_model_type(hf_config_type.from_dict(config_to_hf(config)))
    ref_shapes = {canonical_name(k, config): tuple(v.shape) for k, v in ref.state_dict().items()}
    if config.tie_word_embeddings:  # the tied head is the embedding, not a separate tensor
        assert "lm_head.weight" in ref_shapes
        ref_shapes.pop("lm_head.weight")
    flat = {"/".join(k): leaf.shape for k, leaf in
            traverse_util.flatten_dict(nn.meta.unbox(abstract_params(module))).items()}
    slots = tensor_slots(config)
    assert set(slots) == set(ref_shapes)
    # Each parameter (each layer of a stacked one) is exactly one HF tensor, none left over.
    places = [(slot.path, slot.layer) for slot in slots.values()]
    assert len(set(places)) == len(places)
    assert set(places) == {(path, layer) for path, shape in flat.items()
                           for layer in (range(shape[0]) if path.startswith("language_model/layers/") else [None])}
    for name, slot in slots.items():
        shape = flat[slot.path] if slot.layer is None else flat[slot.path][1:]
        assert hf_shape(slot.rule, shape, config) == ref_shapes[name], name
    total = sum(int(np.prod(shape)) for shape in flat.values())
    assert total == sum(int(np.prod(s)) for s in ref_shapes.values())
    return total

