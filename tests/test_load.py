"""The one model loader (`fourd_jax.load`): an HF directory, an Orbax checkpoint and a training
workdir give the same model and params, each with the tokenizer found beside it; bad paths and
mismatched tokenizers are one sentence; checkpoints name their model family."""

import json
import os
import shutil
import stat

import jax
import numpy as np
import pytest
from run_configs import run_script

from fourd_jax import checkpoint, families
from fourd_jax.convert import hf
from fourd_jax.data.latent_tokens import add_latent_tokens
from fourd_jax.data.tokenizer import build_tokenizer, config_for_tokenizer
from fourd_jax.errors import InputError
from fourd_jax.load import check_latent_ids, find_model, load_model
from fourd_jax.model.apply import init_params
from fourd_jax.model.config import tiny
from fourd_jax.model.vlm import Qwen25VL


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One tiny model written three ways: a training workdir (checkpoints/ + tokenizer/), an Orbax
    directory with nothing beside it, and an HF directory with its tokenizer."""
    root = tmp_path_factory.mktemp("load")
    tokenizer = build_tokenizer(["the camera pans left", "the object moves up"] * 20, vocab_size=300)
    model = Qwen25VL(config_for_tokenizer(tokenizer, tiny()))
    params = init_params(model, jax.random.key(3))
    checkpoint.save_params(root / "workdir" / "checkpoints", model, params, step=5)
    tokenizer.save_pretrained(root / "workdir" / "tokenizer")
    checkpoint.save_params(root / "alone" / "ckpt", model, params)
    hf.save(model, params, root / "hf", tokenizer=tokenizer)
    return root, model, params, tokenizer


def test_every_form_of_a_path_loads_the_same_model(saved):
    root, model, params, _ = saved
    for path, kind, weights, tokenizer in [
        (root / "workdir", "orbax", root / "workdir" / "checkpoints", root / "workdir" / "tokenizer"),
        (root / "workdir" / "checkpoints", "orbax", root / "workdir" / "checkpoints", root / "workdir" / "tokenizer"),
        (root / "alone" / "ckpt", "orbax", root / "alone" / "ckpt", None),
        (root / "hf", "hf", root / "hf", root / "hf"),
    ]:
        loaded = load_model(path)
        assert (loaded.source.kind, loaded.source.weights) == (kind, str(weights)), path
        assert loaded.source.tokenizer == (str(tokenizer) if tokenizer else ""), path
        assert loaded.model.config == model.config, path
        jax.tree_util.tree_map(np.testing.assert_array_equal, loaded.params, params)


def test_overrides_and_steps_reach_the_model(saved):
    root, model, _, _ = saved
    loaded = load_model(root / "workdir", step=5, dtype="bfloat16", attention_block=16)
    assert loaded.model.config.dtype == "bfloat16" and loaded.model.config.attention_block == 16
    with pytest.raises(InputError, match=r"has no step 7 \(it has \[5\]\)"):
        load_model(root / "workdir", step=7)
    with pytest.raises(InputError, match="is a Hugging Face directory, which has no steps; drop the step."):
        load_model(root / "hf", step=0)


def test_a_missing_path_is_one_sentence_naming_the_argument(tmp_path):
    with pytest.raises(InputError, match=f"^model.init_from {tmp_path / 'nope'} does not exist.$"):
        find_model(tmp_path / "nope", "model.init_from")
    with pytest.raises(InputError, match=r"^--checkpoint \(empty\) does not exist.$"):
        find_model("")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no complete Orbax checkpoint"):
        load_model(tmp_path / "empty")


def test_checkpoints_name_their_family_and_an_unknown_one_is_refused(saved, tmp_path):
    root, model, params, _ = saved
    item = checkpoint.model_item(model.config)
    assert item["family"] == families.DEFAULT.name == "qwen2_5_vl"
    assert {k: v for k, v in item.items() if k != "family"} == model.config.to_dict()
    step_dir = root / "alone" / "ckpt" / "0" / "model"
    stored = json.loads(next(p for p in step_dir.rglob("*") if p.is_file() and p.suffix in ("", ".json")).read_text())
    assert stored["family"] == "qwen2_5_vl"
    # A checkpoint written before families were recorded restores as the default family.
    old = tmp_path / "old"
    checkpoint.save_params(old, model, params)
    for path in (old / "0" / "model").rglob("*"):
        if path.is_file() and "family" in path.read_text():
            path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "family"}))
            break
    else:
        raise AssertionError("no model item with the family was found")
    assert load_model(old).model.config == model.config
    stranger = tmp_path / "stranger"
    checkpoint.save_params(stranger, model, params)
    for path in (stranger / "0" / "model").rglob("*"):
        if path.is_file() and "family" in path.read_text():
            path.write_text(json.dumps({**json.loads(path.read_text()), "family": "qwen9_vl"}))
    with pytest.raises(InputError, match="holds a model of family 'qwen9_vl', which is not one of"):
        load_model(stranger)


def test_a_tokenizer_with_other_latent_ids_is_refused(saved):
    _, model, _, tokenizer = saved
    start, pad, end = add_latent_tokens(tokenizer)
    latent = model.config.replace(latent_start_token_id=start, latent_pad_token_id=pad, latent_end_token_id=end)
    check_latent_ids(tokenizer, latent, "tok")  # the same ids: accepted
    shifted = latent.replace(latent_start_token_id=pad, latent_pad_token_id=start)
    with pytest.raises(InputError, match="tokenizer tok maps the latent tokens to"):
        check_latent_ids(tokenizer, shifted, "tok")


def test_convert_refuses_the_wrong_kind_of_source_before_reading_it(saved, tmp_path):
    root, _, _, _ = saved
    result = run_script(["convert", "hf-to-jax", root / "workdir", tmp_path / "x"])
    assert result.returncode == 2
    assert result.stderr.strip() == (f"fourd-jax convert: error: src {root / 'workdir'} is an Orbax directory; "
                                     "hf-to-jax reads a Hugging Face one.")
    result = run_script(["convert", "jax-to-hf", root / "hf", tmp_path / "y"])
    assert result.returncode == 2 and "is a Hugging Face directory; jax-to-hf reads an Orbax one." in result.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_convert_exports_a_training_workdir_with_its_tokenizer_and_ordinary_permissions(saved, tmp_path):
    root, model, params, tokenizer = saved
    previous = os.umask(0o022)  # inherited by the command
    try:
        result = run_script(["convert", "jax-to-hf", root / "workdir", tmp_path / "hf"])
    finally:
        os.umask(previous)
    assert result.returncode == 0 and "wrote Hugging Face checkpoint" in result.stdout
    exported = load_model(tmp_path / "hf")
    assert exported.source.tokenizer == str(tmp_path / "hf")  # the workdir's tokenizer came along
    jax.tree_util.tree_map(np.testing.assert_array_equal, exported.params, params)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert stat.S_IMODE((tmp_path / "hf" / name).stat().st_mode) == 0o644, name


def test_eval_and_convert_name_a_step_that_does_not_restore(saved, tmp_path):
    root, _, _, _ = saved
    workdir = tmp_path / "workdir"
    shutil.copytree(root / "workdir", workdir)
    chunks = sorted(p for p in (workdir / "checkpoints" / "5" / "params").rglob("*") if p.is_file()
                    and p.parent.name == "d")
    chunks[0].unlink()
    for command in (["convert", "jax-to-hf", workdir, tmp_path / "hf"],
                    ["eval", "--checkpoint", workdir, "--data", root / "hf", "--out", tmp_path / "ev"]):
        result = run_script(command)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr[-3000:]
        line = lines[0]
        assert line.startswith(f"fourd-jax {command[0]}: error: {workdir / 'checkpoints'} step 5 does not restore (")
        assert f'at local file "{workdir / "checkpoints" / "5" / "params"}/"' in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["workdir"]
