"""4DRL (GRPO) runs: `fourd-jax rl --config rl:PRESET --init DIFT_WORKDIR`.

Built on the DIFT config of the same preset (model, data, mesh, distributed and checkpoint
settings mean the same there), with the 4DThinker RL recipe (SPEC 3.5) for qwen25vl_3b / _7b:
G = 8 rollouts at temperature 1.0, top-p 0.9, beta 0.01 with the k1 estimator, one iteration,
lr 1e-6, at most 16 frames with the longest side <= 448. qwen3vl_2b / _4b / _8b: the same recipe on
Qwen3-VL. mllm4d_qwen3vl_8b: the MLLM-4D GRPO recipe (SPEC 5): Qwen3-VL-8B with LoRA r 128 (from the
`sft:mllm4d_qwen3vl_8b` run), G = 12 at temperature 1.0, beta 0.001, lr 1e-4 on the adapters, up to
32 frames, rewarded by the ST-reward (MLLM-4D records; `rl.sample_reward`).
"""

import ml_collections

from fourd_jax.configs import dift, sft

# The GRPO update holds more beside the state than a DIFT step: the micro-batches' summed gradients
# and the frozen reference policy. The 7B update needs more than 256 GiB of HBM in all (16 v5e or
# 8 v6e chips do not hold it), so on larger slices the RL meshes shard the state over more chips
# than DIFT's: 64 on v5e-64/256 (fsdp 32 x tensor 2), 32 on v6e-64 (docs/SCALE.md).
MESHES = {**dift.MESHES, "v5e-64": (1, 32, 2), "v5e-256": (4, 32, 2), "v6e-64": (2, 32, 1)}


MLLM4D = "mllm4d_qwen3vl_8b"


def dift_config(arg: str) -> ml_collections.ConfigDict:
    if arg.partition(",")[0] == MLLM4D:  # built on its SFT stage: the same model, LoRA and data layout
        return sft.get_config(arg)
    return dift.get_config(arg)


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    c = dift_config(arg)

    c.rl = ml_collections.ConfigDict()
    c.rl.num_generations = 4  # G rollouts per prompt
    c.rl.epsilon = 0.2
    c.rl.beta = 0.01
    c.rl.kl_estimator = "k1"  # upstream 4DThinker; "k3" also offered
    c.rl.num_iterations = 1
    c.rl.aggregation = "sequence-mean"  # per-sequence masked mean, then batch mean; or "token-mean"
    c.rl.latent_gradient = False  # True: policy gradient on latent-block tokens too (an ablation, not the recipe)

    c.sample = ml_collections.ConfigDict()
    c.sample.temperature = 1.0
    c.sample.top_p = 0.9
    c.sample.top_k = 0
    c.sample.max_new_tokens = 48
    c.sample.stop_strings = ("</answer>",)
    c.sample.imagery = True  # latent blocks with fed hidden states after <|latent_start|>
    c.sample.max_latent_blocks = 8

    c.reward = ml_collections.ConfigDict()
    c.reward.accuracy = 1.0  # 4DThinker
    c.reward.format = 0.2
    c.reward.st_format = 0.2  # MLLM-4D ST-reward
    c.reward.st_accuracy = 0.6
    c.reward.st_camera = 0.1
    c.reward.st_object = 0.1

    c.data.batch_size = 2  # prompts per step (global); x G rollouts
    c.data.video_max_side = 0  # longest frame side after resizing; 0 = no cap (the presets: 448)
    c.train.eval_batches = 0
    c.train.best_metric = ""
    c.train.checkpoint_every = 20
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 0
    c.optim.total_steps = 40
    c.optim.weight_decay = 0.0

    name = arg.partition(",")[0]
    if name in dift.RECIPE_PRESETS:
        c.rl.num_generations = 8
        c.sample.max_new_tokens = 1024
        c.data.batch_size = 8
        c.data.max_frames = 16
        c.data.video_max_pixels = 448 * 448
        c.data.video_max_side = 448  # SPEC 2: RL frames have their longest side <= 448
        c.data.seq_buckets = (2048, 2560)  # 16 frames at 448x448 are 2048 video tokens; with the question, 2245 at most
        c.data.path = "data/rl"
        c.optim.lr = 1e-6
        c.optim.min_lr_ratio = 1.0  # constant after warmup
        c.optim.total_steps = 500
        c.train.checkpoint_every = 50
    elif name == MLLM4D:
        c.rl.num_generations = 12
        c.rl.beta = 0.001
        c.sample.temperature = 1.0
        c.sample.top_p = 1.0
        c.sample.imagery = False  # ST-CoT is text: no latent blocks
        c.sample.max_new_tokens = 1024
        c.sample.stop_strings = ("</answer>",)
        # The ST-reward (maximum 1.0): 0.2 format + 0.6 accuracy + 0.1 camera + 0.1 object centres.
        c.reward.st_format, c.reward.st_accuracy, c.reward.st_camera, c.reward.st_object = 0.2, 0.6, 0.1, 0.1
        c.data.path = "data/mllm4d_rl"
        c.data.batch_size = 8
        c.data.max_frames = 32
        # 32 frames are 16 temporal patches of 256 merged tokens (factor-32 frames) with their timestamps.
        c.data.seq_buckets = (4096, 5120)
        c.optim.lr = 1e-4  # on the LoRA parameters (lora.rank 128 from the SFT preset)
        c.optim.min_lr_ratio = 1.0
        c.optim.total_steps = 500
        c.train.checkpoint_every = 50
    mesh = arg.partition(",")[2]
    if mesh:
        for_slice(c, mesh)
    return c


def for_slice(c: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """The config's choices for a slice (a `MESHES` name): its mesh, and for the 3B/7B recipes the
    GRPO micro-batches: on 16 and 32 GiB chips (v5e, v6e) one sample of each prompt at a time, on
    v5p (95 GiB) the whole group at once (docs/SCALE.md)."""
    dift.for_slice(c, name)
    c.mesh.shape = MESHES[name]
    if c.model.preset != "tiny":
        c.optim.grad_accum = 1 if name.startswith("v5p") else c.rl.num_generations
    return c
