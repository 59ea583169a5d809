"""Qwen2.5-VL and Qwen3-VL in Flax Linen, with 4DThinker latent-imagery inputs.

Import from the defining modules; the package itself imports nothing, so the host-side modules
(`config`, `layout`, `positions`) load without JAX or Flax:

    config     ModelConfig, TextConfig, VisionConfig and the presets (tiny, qwen25vl_3b, ...)
    layout     VisionLayout, vision_layout, num_patches: the vision tower's padded media layout (numpy)
    positions  get_rope_index: M-RoPE positions (numpy)
    inputs     VisionInputs, prepare_vision, check_placeholders, PreparedInputs, prepare_inputs,
               vision_inputs: host-side preparation of processor outputs and training batches
    vlm        Qwen25VL (the Linen module), ModelOutput
    apply      forward, encode_vision, init_params, abstract_params, dummy_inputs: jitted entry points
    text       KVCache, init_kv_cache, the decoder; vision: the tower; rope: M-RoPE angles
    imagery    grow_embeddings, add_latent_imagery, chunk_means, segment_means, imagery_targets

Qwen3-VL (the second family, `fourd_jax.families.QWEN3_VL`) reuses the decoder, attention, KV cache,
M-RoPE and the multimodal wrapper:

    qwen3vl_config  Qwen3VLConfig, Qwen3TextConfig, Qwen3VisionConfig, presets (qwen3vl_2b/4b/8b, tiny)
    qwen3vl_layout  Qwen3VisionLayout, qwen3_vision_layout, get_rope_index: host-side bookkeeping (numpy)
    qwen3vl         Qwen3VL (the Linen module, a Qwen25VL with its own tower and DeepStack), the tower
"""
