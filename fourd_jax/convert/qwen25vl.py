"""Qwen2.5-VL on the Hugging Face side: its tensor name table and its config mapping.

`NAMES` pairs each HF tensor name with a parameter path and a layout transform (the rule types
are in `fourd_jax.convert.tables`); `config_from_hf` / `config_to_hf` map a `transformers`
Qwen2_5_VLConfig to and from `ModelConfig`. `fourd_jax.families` points here.
"""

from __future__ import annotations

import re
from typing import Any

from fourd_jax.convert.tables import CheckpointError, NameTable, Rule
from fourd_jax.errors import InputError
from fourd_jax.model.config import ModelConfig, TextConfig, VisionConfig

_DEC = "language_model/layers/"
_VIS = "visual/blocks_{i}/"
RULES: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", "language_model/embed_tokens/embedding"),
    Rule("model.norm.weight", "language_model/norm/weight"),
    Rule("lm_head.weight", "lm_head/kernel", "linear"),
    Rule("model.layers.{i}.input_layernorm.weight", _DEC + "input_layernorm/weight", stacked=True),
    Rule("model.layers.{i}.post_attention_layernorm.weight", _DEC + "post_attention_layernorm/weight",
         stacked=True),
    *(Rule(f"model.layers.{{i}}.self_attn.{p}_proj.weight", _DEC + f"{p}_proj/kernel", "linear",
           stacked=True) for p in "qkv"),
    *(Rule(f"model.layers.{{i}}.self_attn.{p}_proj.bias", _DEC + f"{p}_proj/bias", "flat",
           stacked=True) for p in "qkv"),
    Rule("model.layers.{i}.self_attn.o_proj.weight", _DEC + "o_proj/kernel", "linear", n_in=2,
         stacked=True),
    *(Rule(f"model.layers.{{i}}.mlp.{p}_proj.weight", _DEC + f"mlp/{p}_proj/kernel", "linear",
           stacked=True) for p in ("gate", "up", "down")),
    Rule("visual.patch_embed.proj.weight", "visual/patch_embed/kernel", "conv"),
    Rule("visual.blocks.{i}.norm1.weight", _VIS + "norm1/weight"),
    Rule("visual.blocks.{i}.norm2.weight", _VIS + "norm2/weight"),
    Rule("visual.blocks.{i}.attn.qkv.weight", _VIS + "attn/qkv/kernel", "linear"),
    Rule("visual.blocks.{i}.attn.qkv.bias", _VIS + "attn/qkv/bias", "flat"),
    Rule("visual.blocks.{i}.attn.proj.weight", _VIS + "attn/proj/kernel", "linear", n_in=2),
    Rule("visual.blocks.{i}.attn.proj.bias", _VIS + "attn/proj/bias"),
    *(Rule(f"visual.blocks.{{i}}.mlp.{p}_proj.{w}", _VIS + f"mlp/{p}_proj/{k}",
           "linear" if w == "weight" else "same")
      for p in ("gate", "up", "down") for w, k in (("weight", "kernel"), ("bias", "bias"))),
    Rule("visual.merger.ln_q.weight", "visual/merger/ln_q/weight"),
    Rule("visual.merger.mlp.0.weight", "visual/merger/mlp_0/kernel", "linear"),
    Rule("visual.merger.mlp.0.bias", "visual/merger/mlp_0/bias"),
    Rule("visual.merger.mlp.2.weight", "visual/merger/mlp_2/kernel", "linear"),
    Rule("visual.merger.mlp.2.bias", "visual/merger/mlp_2/bias"),
)

# Names `transformers` >= 5 uses in memory (and some exports); normalised to the on-disk ones.
ALIASES = ((re.compile(r"^model\.language_model\."), "model."), (re.compile(r"^model\.visual\."), "visual."))
NAMES = NameTable(RULES, ALIASES)


def config_from_hf(hf_config: dict[str, Any], source: str = "config.json", **overrides) -> ModelConfig:
    """A ModelConfig from a `transformers` Qwen2.5-VL config dict (flat or nested layout); the
    model_type is `fourd_jax.convert.hf.config_from_hf`'s to check."""
    from transformers import Qwen2_5_VLConfig  # slow to import; only conversion needs it

    cfg = Qwen2_5_VLConfig.from_dict(dict(hf_config))
    t, v = cfg.text_config, cfg.vision_config
    rope = dict(t.rope_parameters or {})
    unsupported = [
        (f"text_config.hidden_act = {t.hidden_act!r}", t.hidden_act != "silu"),
        (f"vision_config.hidden_act = {v.hidden_act!r}", v.hidden_act != "silu"),
        ("text_config.use_sliding_window = true", bool(getattr(t, "use_sliding_window", False))),
        (f"rope_type {rope.get('rope_type')!r}", rope.get("rope_type", "default") != "default"),
        ("no mrope_section", "mrope_section" not in rope),
    ]
    for what, bad in unsupported:
        if bad:
            raise CheckpointError(f"{source}: {what} is not supported by fourd_jax's Qwen2.5-VL.")
    vision_rope = dict(v.rope_parameters or {})
    latent = {k: hf_config.get(k) for k in
              ("latent_start_token_id", "latent_pad_token_id", "latent_end_token_id")}
    if "mrope_text_start" in hf_config:  # written by `save` for a non-default mode
        latent["mrope_text_start"] = hf_config["mrope_text_start"]
    fields = dict(
        text=TextConfig(
            vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
            num_layers=t.num_hidden_layers, num_heads=t.num_attention_heads,
            num_kv_heads=t.num_key_value_heads, rope_theta=float(rope["rope_theta"]),
            mrope_section=tuple(int(s) for s in rope["mrope_section"]), rms_norm_eps=t.rms_norm_eps,
            max_position_embeddings=t.max_position_embeddings,
        ),
        vision=VisionConfig(
            depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
            num_heads=v.num_heads, out_hidden_size=v.out_hidden_size, patch_size=v.patch_size,
            temporal_patch_size=v.temporal_patch_size, spatial_merge_size=v.spatial_merge_size,
            window_size=v.window_size, fullatt_block_indexes=tuple(v.fullatt_block_indexes),
            in_channels=v.in_channels, tokens_per_second=v.tokens_per_second,
            rope_theta=float(vision_rope.get("rope_theta", 10000.0)),
        ),
        tie_word_embeddings=bool(cfg.tie_word_embeddings),
        image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
        vision_start_token_id=cfg.vision_start_token_id, vision_end_token_id=cfg.vision_end_token_id,
        bos_token_id=t.bos_token_id, eos_token_id=_first(t.eos_token_id), pad_token_id=t.pad_token_id,
        initializer_range=t.initializer_range,
        **latent,
    )
    fields.update(overrides)
    try:
        return ModelConfig(**fields)
    except InputError as e:
        raise CheckpointError(f"{source}: {e}") from None


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) else x


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The `transformers` config dict (nested layout, as transformers 5 writes it)."""
    from transformers import Qwen2_5_VLConfig  # slow to import; only conversion needs it

    t, v = config.text, config.vision
    extra = {k: getattr(config, k) for k in
             ("latent_start_token_id", "latent_pad_token_id", "latent_end_token_id")
             if getattr(config, k) is not None}
    if config.mrope_text_start != ModelConfig.mrope_text_start:  # keep a non-default mode on reload
        extra["mrope_text_start"] = config.mrope_text_start
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
            num_key_value_heads=t.num_kv_heads, rms_norm_eps=t.rms_norm_eps,
            max_position_embeddings=t.max_position_embeddings, hidden_act="silu",
            rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta,
                             "mrope_section": list(t.mrope_section)},
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id, initializer_range=config.initializer_range,
        ),
        vision_config=dict(
            depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
            num_heads=v.num_heads, out_hidden_size=v.out_hidden_size, patch_size=v.patch_size,
            temporal_patch_size=v.temporal_patch_size, spatial_merge_size=v.spatial_merge_size,
            window_size=v.window_size, fullatt_block_indexes=list(v.fullatt_block_indexes),
            in_channels=v.in_channels, tokens_per_second=v.tokens_per_second, hidden_act="silu",
            rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta},
        ),
        image_token_id=config.image_token_id, video_token_id=config.video_token_id,
        vision_start_token_id=config.vision_start_token_id,
        vision_end_token_id=config.vision_end_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
        **extra,
    )
    out = cfg.to_dict()
    out["architectures"] = ["Qwen2_5_VLForConditionalGeneration"]
    out["dtype"] = config.param_dtype
    return out
