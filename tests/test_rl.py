"""4DRL: group advantages, the text-only policy mask (zero gradient at latent positions), KL
estimators, log-prob recomputation equal to the sampler's, the rewards wiring, exact resume."""

import contextlib
import json

import flax.linen as nn
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from run_configs import load_config, tiny_records

from fourd_jax import sharding
from fourd_jax.data.pipeline import build_dataset
from fourd_jax.errors import InputError
from fourd_jax.load import find_model
from fourd_jax.model.vision import VisionTower
from fourd_jax.sample import token_logprobs
from fourd_jax.train import loop, rl
from fourd_jax.train.settings import GrpoConfig, RunSettings


def rl_config(**overrides):
    return load_config("rl", **{"data.seq_buckets": (1024,), "sample.max_new_tokens": 16, **overrides})


@contextlib.contextmanager
def counting_tower_calls():
    """Yields a list whose one element counts the vision tower's forwards traced or run inside."""
    calls = [0]

    def count(next_fn, args, kwargs, context):
        calls[0] += isinstance(context.module, VisionTower) and context.method_name == "__call__"
        return next_fn(*args, **kwargs)

    with nn.intercept_methods(count):
        yield calls


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_records(tmp_path_factory.mktemp("rl_data"), seed=7)


def test_group_advantages_normalise_each_group():
    adv = rl.group_advantages(np.array([1.0, 0.0, 0.2, 0.2, 3.0, 1.0, 2.0, 0.0]), 2)
    std = np.std([1.0, 0.0], ddof=1)
    np.testing.assert_allclose(adv[:2], [0.5 / (std + 1e-4), -0.5 / (std + 1e-4)], rtol=1e-6)
    np.testing.assert_allclose(adv[2:4], [0.0, 0.0])  # a group that agrees teaches nothing
    np.testing.assert_allclose(adv[4:6], [1.0 / (np.std([3.0, 1.0], ddof=1) + 1e-4), -1.0 / (np.sqrt(2) + 1e-4)],
                               rtol=1e-6)


def test_kl_estimators():
    logp, ref = jnp.array([-1.0, -2.0, -0.5]), jnp.array([-1.5, -2.0, -0.2])
    np.testing.assert_allclose(rl.kl_penalty(logp, ref, "k1"), logp - ref)
    k3 = np.exp(ref - logp) - (ref - logp) - 1
    np.testing.assert_allclose(rl.kl_penalty(logp, ref, "k3"), k3, rtol=1e-6)
    assert (np.asarray(rl.kl_penalty(logp, ref, "k3")) >= 0).all()
    with pytest.raises(InputError, match="kl_estimator"):
        GrpoConfig(kl_estimator="k2")


@pytest.mark.parametrize("aggregation", ["sequence-mean", "token-mean"])
def test_policy_gradient_never_reaches_latent_positions(aggregation):
    latent = (50, 51, 52)
    tokens = jnp.array([[3, 50, 51, 51, 52, 7, 9, 0], [4, 5, 50, 51, 51, 52, 8, 0]])
    completion = jnp.array([[1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1]], bool)
    mask = rl.policy_token_mask(tokens, completion, latent)
    assert np.asarray(mask).tolist() == [[1, 0, 0, 0, 0, 1, 1, 0], [1, 1, 0, 0, 0, 0, 1, 1]]
    logits = jax.random.normal(jax.random.key(0), (2, 8, 60))
    ref = token_logprobs(jax.random.normal(jax.random.key(1), (2, 8, 60)), tokens, 1.0)
    config = GrpoConfig(num_generations=2, beta=0.04, aggregation=aggregation)

    def loss(logits):
        logp = token_logprobs(logits, tokens, 1.0)
        return rl.grpo_objective(logp, old_logprobs=None, ref_logprobs=ref, advantages=jnp.array([1.0, -0.5]),
                                 mask=mask, config=config)[0]

    grads = np.asarray(jax.grad(loss)(logits))
    at_latent = np.isin(np.asarray(tokens), latent)
    assert (grads[at_latent] == 0).all()  # exactly zero, not just small
    assert (np.abs(grads[np.asarray(mask)]).sum(-1) > 0).all()


def test_rl_step_scores_the_sampled_sequences(data, monkeypatch):
    path, tokenizer = data
    config = rl_config(**{"rl.num_iterations": 2, "rl.kl_estimator": "k3"})
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    trainer = rl.make_rl_trainer(RunSettings.of(config), tokenizer, mesh)
    prompts = RunSettings.of(config).pipeline(supervised=False, left_pad=True)
    batch = next(iter(build_dataset(path / "train", tokenizer, trainer.model.config, prompts)))
    assert batch["rope_deltas"].shape == (2,) and (batch["attention_mask"][:, -1] == 1).all()
    assert batch["example_mask"].all()
    # Every group gets a spread of rewards, so the advantages are non-zero and the update must move
    # the policy: the real reward plus 0.5 on odd rows (real rewards lie in {0, 0.2, 1, 1.2}, so no
    # two differ by 0.5 and no group's are all equal). The sampled rollout is kept to check the
    # update's direction on it.
    seen = {"rewards": []}
    real_reward, real_generate = rl.sample_reward, rl.generate

    def reward(*args):
        scored = dict(real_reward(*args))
        scored["reward"] += 0.5 * (len(seen["rewards"]) % 2)
        seen["rewards"].append(scored["reward"])
        return scored

    def generate(params, prompt, key, **kwargs):
        seen["prompt"], seen["rollout"] = prompt, real_generate(params, prompt, key, **kwargs)
        return seen["rollout"]

    monkeypatch.setattr(rl, "sample_reward", reward)
    monkeypatch.setattr(rl, "generate", generate)
    before = jax.tree_util.tree_map(np.asarray, trainer.state.params)
    with counting_tower_calls() as tower_calls:  # the first step traces every program it runs
        state, metrics = trainer.step_fn(trainer.state, batch)
    # The frozen tower runs once per step: the rollout, the reference and the update take its tokens.
    assert tower_calls[0] == 1
    assert int(state.step) == 1 and metrics["finite"]
    assert float(metrics["logprob_drift"]) <= 1e-5  # the recomputed log-probs are the sampler's
    g = config.rl.num_generations
    given = np.asarray(seen["rewards"])
    real = given - 0.5 * (np.arange(len(given)) % 2)
    assert len(given) == 2 * g and ((real >= 0) & (real <= 1.2)).all() and "reward_format" in metrics
    np.testing.assert_allclose([metrics["reward"], metrics["reward_std"]], [given.mean(), given.std()], rtol=1e-6)
    assert metrics["policy_tokens"] > 0 and np.isfinite(float(metrics["loss"]))
    groups = given.reshape(-1, g)
    adv = ((groups - groups.mean(1, keepdims=True)) / (groups.std(1, ddof=1, keepdims=True) + 1e-4)).reshape(-1)
    assert (np.abs(adv.reshape(-1, g)).max(1) > 0.1).all()  # no group without a spread

    after = jax.tree_util.tree_map(np.asarray, state.params)
    for a, b in zip(jax.tree_util.tree_leaves(before["visual"]), jax.tree_util.tree_leaves(after["visual"]),
                    strict=True):
        np.testing.assert_array_equal(a, b)  # frozen
    for a, b in zip(jax.tree_util.tree_leaves(before["language_model"]),
                    jax.tree_util.tree_leaves(after["language_model"]), strict=True):
        assert not np.array_equal(a, b)  # every trainable leaf moved

    # The direction: on the sampled sequences, the clipped surrogate + beta * k3 KL (old policy and
    # reference = the params that sampled), written here in numpy, is lower after the update.
    c, rollout = trainer.model.config, seen["rollout"]
    with jax.set_mesh(mesh), nn.logical_axis_rules(RunSettings.of(config).rules):
        score = jax.jit(lambda p, prompt, rollout: rl.completion_logprobs(
            p, trainer.model, prompt, rollout, g, config.sample.temperature))
        old, new = (np.asarray(score(p, seen["prompt"], rollout), np.float64) for p in (before, state.params))
    tokens = np.asarray(rollout.tokens)
    mask = np.asarray(rollout.completion_mask) & ~np.isin(tokens, c.latent_token_ids)
    eps, beta = config.rl.epsilon, config.rl.beta

    def loss(logp):
        ratio, a = np.exp(logp - old), adv[:, None]
        per_token = -np.minimum(ratio * a, np.clip(ratio, 1 - eps, 1 + eps) * a)
        per_token += beta * (np.exp(old - logp) - (old - logp) - 1)
        return np.mean((per_token * mask).sum(1) / np.maximum(mask.sum(1), 1))

    assert abs(loss(old)) < 1e-6  # ratio 1: -mean(advantages), which are centred per group
    assert loss(new) < loss(old) - 1e-3, (loss(new), loss(old))


def test_rl_job_resumes_exactly(data, tmp_path):
    path, tokenizer = data
    from fourd_jax import checkpoint
    from fourd_jax.data.tokenizer import config_for_tokenizer
    from fourd_jax.model.apply import init_params
    from fourd_jax.model.config import PRESETS
    from fourd_jax.model.vlm import Qwen25VL

    # A workdir laid out as DIFT leaves it (checkpoints/, tokenizer/); the demo test runs the real DIFT -> RL.
    model = Qwen25VL(config_for_tokenizer(tokenizer, PRESETS["tiny"]()))
    checkpoint.save_params(tmp_path / "dift" / "checkpoints", model, init_params(model, jax.random.key(0)))
    tokenizer.save_pretrained(tmp_path / "dift" / "tokenizer")

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # Sharded over all 8 test devices: 4 prompts over data x fsdp = 4, heads over tensor = 2.
    sharded = {"mesh.shape": (2, 2, 2), "data.batch_size": 4, "rl.num_generations": 2}
    rl.train(RunSettings.of(rl_config(**sharded)), straight, init=str(tmp_path / "dift"), data=str(path), steps=2,
             progress=False)
    rl.train(RunSettings.of(rl_config(**sharded)), resumed, init=str(tmp_path / "dift"), data=str(path), steps=1,
             progress=False)
    rl.train(RunSettings.of(rl_config(**sharded)), resumed, init=str(tmp_path / "dift"), data=str(path), steps=2,
             progress=False)
    rows = [[loop.without_timing(json.loads(line)) for line in (w / "metrics.jsonl").read_text().splitlines()]
            for w in (straight, resumed)]
    assert len(rows[0]) == 2 and rows[0] == rows[1]
    assert (resumed / "tokenizer" / "tokenizer.json").exists()
    with pytest.raises(InputError, match="does not exist"):
        rl.train(RunSettings.of(rl_config()), tmp_path / "x", init=str(tmp_path / "missing"), progress=False)
    (tmp_path / "bare").mkdir()  # a checkpoint directory with no tokenizer beside it
    with pytest.raises(InputError, match="no tokenizer found beside .*bare; pass --config.tokenizer"):
        rl.train(RunSettings.of(rl_config()), tmp_path / "y", init=str(tmp_path / "bare"), progress=False)
    # Without --data, a run takes the records its --init workdir trained on, as that run's manifest names them.
    assert json.loads((straight / "manifest.json").read_text())["data"] == str(path.absolute())
    with pytest.raises(InputError, match="no training data: pass --data DIR"):
        rl.train(RunSettings.of(rl_config(**sharded)), tmp_path / "z", init=str(tmp_path / "dift"), progress=False)
    assert rl.trained_on(find_model(tmp_path / "dift")) == ""
    (tmp_path / "dift" / "manifest.json").write_text(json.dumps({"data": str(path)}))
    for init in (tmp_path / "dift", tmp_path / "dift" / "checkpoints"):
        assert rl.trained_on(find_model(init)) == str(path)


def test_rl_presets_carry_the_4dthinker_recipe():
    for preset in ("qwen25vl_3b", "qwen25vl_7b"):
        c = load_config("rl", f"{preset},v5p-64")
        assert (c.rl.num_generations, c.rl.epsilon, c.rl.beta, c.rl.kl_estimator, c.rl.num_iterations) == (
            8, 0.2, 0.01, "k1", 1)
        assert (c.sample.temperature, c.sample.top_p, c.optim.lr, c.data.max_frames) == (1.0, 0.9, 1e-6, 16)
        assert (c.reward.accuracy, c.reward.format) == (1.0, 0.2) and c.model.preset == preset
        assert c.mesh.shape == (4, 8, 1) and c.model.dtype == "bfloat16"
        assert isinstance(RunSettings.of(c).rl, GrpoConfig)
        # Slice choices (docs/SCALE.md): whole groups on v5p; on 16 GiB v5e chips one sample of each
        # prompt at a time, with the state over 64 chips
        assert c.optim.grad_accum == 1 and c.data.seq_buckets == (2048, 2560)
        small = load_config("rl", f"{preset},v5e-64")
        assert small.mesh.shape == (1, 32, 2) and small.optim.grad_accum == 8


def prompt_runs(jaxpr, inside_loop=False) -> dict:
    """Equations of the prompts' forward (`sample.prefill`'s named scope) in a jaxpr, counted by whether they sit
    inside a loop body (a scan: micro-batches) or not."""
    found = {"in_loop": 0, "outside": 0}
    for eqn in jaxpr.eqns:
        if "prompt_prefill" in str(eqn.source_info.name_stack):
            found["in_loop" if inside_loop else "outside"] += 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            for key, n in prompt_runs(sub, inside_loop or eqn.primitive.name in ("scan", "while")).items():
                found[key] += n
    return found


def test_micro_batched_update_equals_the_whole_batch(data):
    """optim.grad_accum = 2 scores both prompts with half of their G samples at a time: the same loss, metrics
    and update as the whole batch at once, over two GRPO iterations with a KL to a reference, with the prompts
    run once per iteration rather than once per micro-batch."""
    import functools

    import optax

    from fourd_jax.batch import prompt_inputs
    from fourd_jax.sample import generate
    from fourd_jax.train.optim import trainable_mask
    from fourd_jax.train.state import new_state

    path, tokenizer = data
    settings = RunSettings.of(rl_config(**{"rl.num_iterations": 2, "rl.beta": 0.04}))
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    trainer = rl.make_rl_trainer(settings, tokenizer, mesh)
    model, g = trainer.model, settings.rl.num_generations
    batch = next(iter(build_dataset(path / "train", tokenizer, model.config,
                                    settings.pipeline(supervised=False, left_pad=True))))
    params = jax.device_get(trainer.state.params)
    with jax.set_mesh(mesh), nn.logical_axis_rules(settings.rules):
        prompt = prompt_inputs(batch, mesh, settings.rules)
        assert prompt.vision is not None and prompt.input_ids.shape[0] == 2
        rollout = generate(params, prompt, jax.random.key(3), model=model,
                           config=rl.sampling_config(settings, tokenizer, model.config), num_samples=g)
        shifted = jax.tree_util.tree_map(lambda x: x * 1.01, params)
        ref = rl.completion_logprobs(shifted, model, prompt, rollout, g, settings.rl.temperature)
        advantages = jnp.asarray(rl.group_advantages(np.arange(2 * g, dtype=np.float32) % 3, g))
        # Plain SGD: the parameters move by lr x the gradient, so comparing them compares the gradients
        # (Adam would divide float-order noise in near-zero gradients by its own scale). Large: the 2nd
        # iteration clips.
        tx = optax.sgd(5.0)
        results, runs = [], []
        for k in (1, 2):
            update = jax.jit(functools.partial(rl.update_step, model=model, tx=tx, config=settings.rl,
                                               trainable=trainable_mask(params, settings.optim.freeze),
                                               micro_batches=k))
            state, metrics = update(new_state(params, tx, 0), prompt, rollout, advantages, ref)
            results.append(jax.device_get((metrics, state.params)))
            jaxpr = jax.make_jaxpr(update)(new_state(params, tx, 0), prompt, rollout, advantages, ref)
            runs.append(prompt_runs(jaxpr.jaxpr))
        # The prompts run once per iteration, outside the micro-batches' loop (before: once per micro-batch)
        assert runs[1]["outside"] > 0 and runs[1]["in_loop"] == 0, runs
        # The frozen tower runs once per update, outside the micro-batches and iterations: traced once,
        # and its precomputed tokens give the log-probs of running it inside the scoring forward.
        features = rl.frozen_vision_features(params, trainable_mask(params, settings.optim.freeze), model, prompt)
        inside = rl.completion_logprobs(params, model, prompt, rollout, g, settings.rl.temperature)
        outside = rl.completion_logprobs(params, model, prompt, rollout, g, settings.rl.temperature, features)
        np.testing.assert_allclose(np.asarray(outside), np.asarray(inside), atol=1e-6)
        with counting_tower_calls() as calls:
            jax.make_jaxpr(functools.partial(rl.update_step, model=model, tx=tx, config=settings.rl, micro_batches=2,
                                             trainable=trainable_mask(params, settings.optim.freeze)))(
                new_state(params, tx, 0), prompt, rollout, advantages, ref)
        assert calls[0] == 1
    (whole, p_whole), (micro, p_micro) = results
    assert abs(float(whole["kl"])) > 1e-5 and float(whole["clip_fraction"]) > 0  # both terms at work
    for key in ("loss", "kl", "clip_fraction", "logprob_drift", "grad_norm", "policy_tokens", "tokens"):
        np.testing.assert_allclose(float(micro[key]), float(whole[key]), rtol=1e-5, atol=1e-7, err_msg=key)
    # The micro-batches' prompt gradients are pulled back through one prompt forward: the same steps
    # (measured: <= 2.4e-7 apart on steps up to 0.42).
    for a, b, start in zip(*map(jax.tree_util.tree_leaves, (p_micro, p_whole, params)), strict=True):
        np.testing.assert_allclose(a - start, b - start, rtol=1e-5, atol=1e-6)


def test_reference_policy_in_the_compute_dtype_gives_the_same_logits():
    """The frozen reference is held in bfloat16 beside float32 master weights trained in bfloat16:
    every layer casts its weights to the compute dtype anyway, so the logits are bit-identical."""
    from fourd_jax.model.apply import init_params
    from fourd_jax.model.config import tiny
    from fourd_jax.model.vlm import Qwen25VL

    model = Qwen25VL(tiny().replace(dtype="bfloat16", param_dtype="float32"))
    params = init_params(model, jax.random.key(0))
    reference = rl.reference_policy(params, jnp.bfloat16)
    assert {x.dtype for x in jax.tree_util.tree_leaves(reference)} == {jnp.dtype(jnp.bfloat16)}
    ids = jax.random.randint(jax.random.key(1), (2, 12), 0, 100)
    positions = jnp.broadcast_to(jnp.arange(12), (3, 2, 12))
    logits = [model.apply({"params": p}, ids, position_ids=positions).logits for p in (params, reference)]
    np.testing.assert_array_equal(np.asarray(logits[0], np.float32), np.asarray(logits[1], np.float32))
