"""Qwen3-VL on the Hugging Face side: its tensor name table and its config mapping.

`NAMES` pairs each HF tensor name (as `Qwen3VLForConditionalGeneration.save_pretrained` writes it)
with a parameter path of `fourd_jax.model.qwen3vl.Qwen3VL` and a layout transform
(`fourd_jax.convert.tables`); `config_from_hf` / `config_to_hf` map a `transformers` Qwen3VLConfig
to and from `Qwen3VLConfig`. `fourd_jax.families` points here.
"""

from __future__ import annotations

from typing import Any

from fourd_jax.convert.tables import CheckpointError, NameTable, Rule
from fourd_jax.errors import InputError
from fourd_jax.model.qwen3vl_config import Qwen3TextConfig, Qwen3VisionConfig, Qwen3VLConfig

_LM = "model.language_model."
_DEC = "language_model/layers/"
_VIS = "visual/blocks_{i}/"
_DS = "visual/deepstack_merger_{i}/"


def _weight_and_bias(hf: str, path: str, **rule) -> tuple[Rule, Rule]:
    """A Linear (weight as a kernel, bias as is) or, with kind="same", a LayerNorm."""
    return (Rule(f"{hf}.weight", f"{path}/{'kernel' if rule.get('kind') == 'linear' else 'weight'}", **rule),
            Rule(f"{hf}.bias", f"{path}/bias", count=rule.get("count", "vision.depth")))


def _merger(hf: str, path: str, **count) -> tuple[Rule, ...]:
    return (*_weight_and_bias(f"{hf}.norm", f"{path}norm", **count),
            *_weight_and_bias(f"{hf}.linear_fc1", f"{path}linear_fc1", kind="linear", **count),
            *_weight_and_bias(f"{hf}.linear_fc2", f"{path}linear_fc2", kind="linear", **count))


RULES: tuple[Rule, ...] = (
    Rule(_LM + "embed_tokens.weight", "language_model/embed_tokens/embedding"),
    Rule(_LM + "norm.weight", "language_model/norm/weight"),
    Rule("lm_head.weight", "lm_head/kernel", "linear"),
    *(Rule(_LM + f"layers.{{i}}.{n}.weight", _DEC + f"{n}/weight", stacked=True)
      for n in ("input_layernorm", "post_attention_layernorm")),
    *(Rule(_LM + f"layers.{{i}}.self_attn.{p}_proj.weight", _DEC + f"{p}_proj/kernel", "linear", stacked=True)
      for p in "qkv"),
    Rule(_LM + "layers.{i}.self_attn.o_proj.weight", _DEC + "o_proj/kernel", "linear", n_in=2, stacked=True),
    *(Rule(_LM + f"layers.{{i}}.self_attn.{p}_norm.weight", _DEC + f"{p}_norm/weight", stacked=True) for p in "qk"),
    *(Rule(_LM + f"layers.{{i}}.mlp.{p}_proj.weight", _DEC + f"mlp/{p}_proj/kernel", "linear", stacked=True)
      for p in ("gate", "up", "down")),
    Rule("model.visual.patch_embed.proj.weight", "visual/patch_embed/kernel", "conv"),
    Rule("model.visual.patch_embed.proj.bias", "visual/patch_embed/bias"),
    Rule("model.visual.pos_embed.weight", "visual/pos_embed/embedding"),
    *_weight_and_bias("model.visual.blocks.{i}.norm1", _VIS + "norm1"),
    *_weight_and_bias("model.visual.blocks.{i}.norm2", _VIS + "norm2"),
    Rule("model.visual.blocks.{i}.attn.qkv.weight", _VIS + "attn/qkv/kernel", "linear"),
    Rule("model.visual.blocks.{i}.attn.qkv.bias", _VIS + "attn/qkv/bias", "flat"),
    Rule("model.visual.blocks.{i}.attn.proj.weight", _VIS + "attn/proj/kernel", "linear", n_in=2),
    Rule("model.visual.blocks.{i}.attn.proj.bias", _VIS + "attn/proj/bias"),
    *_weight_and_bias("model.visual.blocks.{i}.mlp.linear_fc1", _VIS + "linear_fc1", kind="linear"),
    *_weight_and_bias("model.visual.blocks.{i}.mlp.linear_fc2", _VIS + "linear_fc2", kind="linear"),
    *_merger("model.visual.merger", "visual/merger/"),
    *_merger("model.visual.deepstack_merger_list.{i}", _DS, count="vision.num_deepstack"),
)
NAMES = NameTable(RULES)

_LATENT = ("latent_start_token_id", "latent_pad_token_id", "latent_end_token_id")


def config_from_hf(hf_config: dict[str, Any], source: str = "config.json", **overrides) -> Qwen3VLConfig:
    """A Qwen3VLConfig from a `transformers` Qwen3-VL config dict (config.json as published or as
    transformers 5 writes it); the model_type is `fourd_jax.convert.hf.config_from_hf`'s to check."""
    from transformers import Qwen3VLConfig as HFQwen3VLConfig  # slow to import; only conversion needs it

    cfg = HFQwen3VLConfig.from_dict(dict(hf_config))
    t, v = cfg.text_config, cfg.vision_config
    rope = dict(t.rope_parameters or {})
    unsupported = [
        (f"text_config.hidden_act = {t.hidden_act!r}", t.hidden_act != "silu"),
        (f"vision_config.hidden_act = {v.hidden_act!r}", v.hidden_act != "gelu_pytorch_tanh"),
        ("text_config.attention_bias = true", bool(t.attention_bias)),
        (f"rope_type {rope.get('rope_type')!r}", rope.get("rope_type", "default") != "default"),
        ("no mrope_section", "mrope_section" not in rope),
        ("mrope_interleaved = false", not rope.get("mrope_interleaved", True)),
    ]
    for what, bad in unsupported:
        if bad:
            raise CheckpointError(f"{source}: {what} is not supported by fourd_jax's Qwen3-VL.")
    raw_text = dict(hf_config.get("text_config") or {})
    token = lambda name: raw_text.get(name, hf_config.get(name))  # noqa: E731 - published files put them in both
    fields = dict(
        text=Qwen3TextConfig(
            vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
            num_layers=t.num_hidden_layers, num_heads=t.num_attention_heads, num_kv_heads=t.num_key_value_heads,
            head_dim=t.head_dim, rope_theta=float(rope["rope_theta"]),
            mrope_section=tuple(int(s) for s in rope["mrope_section"]), rms_norm_eps=t.rms_norm_eps,
            max_position_embeddings=t.max_position_embeddings,
        ),
        vision=Qwen3VisionConfig(
            depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_heads=v.num_heads,
            out_hidden_size=v.out_hidden_size, patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
            spatial_merge_size=v.spatial_merge_size, in_channels=v.in_channels,
            num_position_embeddings=v.num_position_embeddings,
            deepstack_visual_indexes=tuple(int(i) for i in v.deepstack_visual_indexes),
            rope_theta=float(dict(v.rope_parameters or {}).get("rope_theta", 10000.0)),
        ),
        tie_word_embeddings=bool(cfg.tie_word_embeddings),
        image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
        vision_start_token_id=cfg.vision_start_token_id, vision_end_token_id=cfg.vision_end_token_id,
        bos_token_id=token("bos_token_id"), eos_token_id=_first(token("eos_token_id")),
        pad_token_id=token("pad_token_id"), initializer_range=t.initializer_range,
        **{k: hf_config.get(k) for k in _LATENT},
    )
    fields.update(overrides)
    try:
        return Qwen3VLConfig(**fields)
    except InputError as e:
        raise CheckpointError(f"{source}: {e}") from None


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) else x


def config_to_hf(config: Qwen3VLConfig) -> dict[str, Any]:
    """The `transformers` config dict (nested layout, as transformers 5 writes it)."""
    from transformers import Qwen3VLConfig as HFQwen3VLConfig  # slow to import; only conversion needs it

    t, v = config.text, config.vision
    cfg = HFQwen3VLConfig(
        text_config=dict(
            vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
            head_dim=t.head_dim, rms_norm_eps=t.rms_norm_eps, max_position_embeddings=t.max_position_embeddings,
            hidden_act="silu", attention_bias=False, pad_token_id=config.pad_token_id,
            initializer_range=config.initializer_range,
            rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta,
                             "mrope_section": list(t.mrope_section), "mrope_interleaved": True},
        ),
        vision_config=dict(
            depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_heads=v.num_heads,
            out_hidden_size=v.out_hidden_size, patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
            spatial_merge_size=v.spatial_merge_size, in_channels=v.in_channels,
            num_position_embeddings=v.num_position_embeddings,
            deepstack_visual_indexes=list(v.deepstack_visual_indexes), hidden_act="gelu_pytorch_tanh",
            initializer_range=config.initializer_range,
            rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta},
        ),
        image_token_id=config.image_token_id, video_token_id=config.video_token_id,
        vision_start_token_id=config.vision_start_token_id, vision_end_token_id=config.vision_end_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
    )
    out = cfg.to_dict()
    # Where the published config.json files keep them (transformers' Qwen3-VL configs drop them).
    for name in ("bos_token_id", "eos_token_id"):
        if getattr(config, name) is not None:
            out[name] = out["text_config"][name] = getattr(config, name)
    out.update({k: getattr(config, k) for k in _LATENT if getattr(config, k) is not None})
    out["architectures"] = ["Qwen3VLForConditionalGeneration"]
    out["dtype"] = config.param_dtype
    return out
