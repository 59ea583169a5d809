"""Latent imagery (SPEC 3.1-3.2): tokens, embedding growth, latent inputs, imagery targets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference import Row, make_batch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from fourd_jax.data.latent_tokens import LATENT_TOKENS, add_latent_tokens, expand_output_images, latent_token_ids
from fourd_jax.data.tokenizer import build_tokenizer, config_for_tokenizer
from fourd_jax.errors import InputError
from fourd_jax.model.apply import init_params
from fourd_jax.model.config import tiny
from fourd_jax.model.imagery import add_latent_imagery, grow_embeddings, imagery_targets
from fourd_jax.model.vlm import Qwen25VL

CORPUS = ["How does the camera move between the first and the last frame? A. Pan Left B. Dolly In"] * 20


def plain_tokenizer():
    words = ["[UNK]", "the", "camera", "moves", "left", "right"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")


def test_latent_tokens_are_added_once_and_survive_saving(tmp_path):
    tok = plain_tokenizer()
    with pytest.raises(ValueError, match=r"no <\|latent_start\|>, <\|latent_pad\|>, <\|latent_end\|> token"):
        latent_token_ids(tok)
    ids = add_latent_tokens(tok)
    assert ids == (6, 7, 8) and add_latent_tokens(tok) == ids and len(tok) == 9
    text = expand_output_images("the camera <output_image> moves", latent_size=4)
    assert text == "the camera <|latent_start|>" + "<|latent_pad|>" * 4 + "<|latent_end|> moves"
    assert tok(text)["input_ids"] == [1, 2, 6, 7, 7, 7, 7, 8, 3]
    tok.save_pretrained(tmp_path)
    assert latent_token_ids(AutoTokenizer.from_pretrained(tmp_path)) == ids


@pytest.mark.parametrize("tied", [True, False])
def test_new_rows_are_the_mean_of_existing_token_rows(tied):
    config = tiny(vocab_size=64, tie_word_embeddings=tied)
    params = init_params(Qwen25VL(config), jax.random.key(0))
    old_tokens = 50
    ids = (50, 51, 70)  # the last one is past the table: it grows to 71 rows
    new_config, new = grow_embeddings(config, params, ids, old_tokens)
    assert new_config.text.vocab_size == 71 and new_config.latent_token_ids == ids
    tables = [("language_model", "embed_tokens", "embedding", lambda a: a)]
    if not tied:
        tables.append(("lm_head", None, "kernel", lambda a: a.T))
    for outer, inner, leaf, rows in tables:
        before = params[outer][inner][leaf] if inner else params[outer][leaf]
        after = new[outer][inner][leaf] if inner else new[outer][leaf]
        before, after = rows(np.asarray(before)), rows(np.asarray(after))
        mean = before[:old_tokens].mean(0)
        for i in ids:
            np.testing.assert_allclose(after[i], mean, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(after[:50], before[:50])
        np.testing.assert_array_equal(after[52:64], before[52:64])
    # The grown model runs.
    out = Qwen25VL(new_config).apply({"params": new}, np.array([[1, 70, 2]]))
    assert out.logits.shape == (1, 3, 71)


def test_add_latent_imagery_grows_model_for_a_tokenizer():
    tok = plain_tokenizer()
    config = tiny(vocab_size=6)
    params = init_params(Qwen25VL(config), jax.random.key(1))
    model, params = add_latent_imagery(Qwen25VL(config), params, tok)
    assert model.config.latent_token_ids == latent_token_ids(tok) == (6, 7, 8)
    assert params["language_model"]["embed_tokens"]["embedding"].shape[0] == 9


def test_latent_embeds_replace_pad_embeddings_like_inputs_embeds(reference):
    """Our latent inputs equal transformers fed the same embeddings through `inputs_embeds`."""
    _, torch_model, _, model, params = reference
    c = model.config
    start, pad, end = c.text.vocab_size - 11, c.text.vocab_size - 10, c.text.vocab_size - 9
    lat = Qwen25VL(c.replace(latent_start_token_id=start, latent_pad_token_id=pad, latent_end_token_id=end))
    ids = np.array([[5, 9, start, pad, pad, pad, pad, end, 11, start, pad, pad, pad, pad, end, 3]])
    rows = np.random.RandomState(0).randn(8, c.text.hidden_size).astype(np.float32)
    ours = lat.apply({"params": params}, ids, latent_embeds=rows)
    with torch.no_grad():
        embeds = torch_model.get_input_embeddings()(torch.tensor(ids))
        embeds[0, torch.tensor(ids[0] == pad)] = torch.tensor(rows)
        # Explicit positions: the session's torch model keeps rope_deltas from earlier generate calls.
        positions = torch.arange(ids.shape[1])[None, None].expand(3, 1, -1)
        ref = torch_model.model(inputs_embeds=embeds, position_ids=positions)
        ref_logits = torch_model.lm_head(ref.last_hidden_state)
    np.testing.assert_allclose(np.asarray(ours.hidden_states), ref.last_hidden_state.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(ours.logits), ref_logits.numpy(), atol=1e-4)
    plain = lat.apply({"params": params}, ids)
    assert np.abs(np.asarray(plain.logits) - np.asarray(ours.logits)).max() > 1e-2


def test_imagery_targets_are_chunk_means_of_frozen_vision_tokens(reference):
    _, torch_model, _, model, params = reference
    grids = [(1, 4, 6), (1, 8, 8)]  # 6 and 16 merged tokens
    batch = make_batch(model.config, [Row([("image", g) for g in grids])])
    targets = np.asarray(imagery_targets(model, params, batch["pixel_values"], batch["image_grid_thw"], latent_size=4))
    with torch.no_grad():
        tokens = torch_model.model.visual(torch.tensor(batch["pixel_values"]),
                                          grid_thw=torch.tensor(batch["image_grid_thw"])).pooler_output.numpy()
    first, second = tokens[:6], tokens[6:]
    expected = np.stack([first[:4].reshape(4, 1, -1).mean(1), second.reshape(4, 4, -1).mean(1)])
    assert targets.shape == (2, 4, model.config.text.hidden_size)
    np.testing.assert_allclose(targets, expected, atol=1e-5)
    # Targets are constants: no gradient reaches the vision tower through them.
    pixels, grid = batch["pixel_values"], batch["image_grid_thw"]
    grad = jax.grad(lambda p: imagery_targets(model, p, pixels, grid, 4).sum())(params)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree_util.tree_leaves(grad))
    with pytest.raises(InputError, match="gives 4 visual tokens, fewer than latent_size 8"):
        imagery_targets(model, params, pixels[:16], np.array([[1, 4, 4]]), latent_size=8)


def test_demo_tokenizer_has_qwen_and_latent_tokens():
    tok = build_tokenizer(CORPUS, vocab_size=300)
    config = config_for_tokenizer(tok, tiny())
    vocab = tok.get_vocab()
    assert config.image_token_id == vocab["<|image_pad|>"] and config.eos_token_id == vocab["<|im_end|>"]
    assert config.latent_token_ids == tuple(vocab[t] for t in LATENT_TOKENS)
    assert config.text.vocab_size >= len(tok)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Where?"}]}],
        tokenize=False, add_generation_prompt=True)
    assert prompt == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                      "<|vision_start|><|video_pad|><|vision_end|>Where?<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="lacks the token"):
        config_for_tokenizer(plain_tokenizer(), tiny())
