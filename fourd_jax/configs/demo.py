"""Settings of `fourd-jax demo` (the end-to-end CPU job: synthesize -> DIFT -> 4DRL -> eval).

    fourd-jax demo --workdir W [--config demo:tiny] [--config.dift.optim.total_steps=120]
"""

import ml_collections

from fourd_jax.configs import dift, rl

STAGES = {"dift": dift, "rl": rl}


def stage_config(name: str, preset: str) -> ml_collections.ConfigDict:
    return STAGES[name].get_config(preset)


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    """arg: the model preset the demo trains from scratch (only 'tiny' fits a CPU demo)."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = arg
    # 3,000 scenes: >= 200 held-out questions for each reported sub-task (docs/LEARNING.md).
    config.num_scenes = 3000  # procedural scenes to synthesise (about 0.04 s each)
    config.split_fractions = (0.85, 0.03, 0.12)  # train / val / test scenes
    config.synth_workers = 2
    # 4DThinker's camera-motion questions with imagery traces; ("camera_motion", "object_direction"), or ()
    # for all four sub-tasks, adds object questions (not learnt at this budget yet: docs/LEARNING.md).
    config.families = ("4dthinker",)
    config.subtasks = ("camera_motion",)
    config.max_camera_moves = 1  # one camera move per scene (SPEC 3.6 combines up to three)
    # The moves a scene's camera may make, and whether camera questions offer exactly four of them in
    # a fixed order (each move keeps its letter, so no in-context option lookup is needed, which a
    # small model trained from scratch does not learn in minutes: docs/LEARNING.md). The blind
    # control then sits at chance, 25%. fourd_jax.data.sim.scene.CAMERA_MOVES and False give the
    # twelve-move shuffled questions.
    config.camera_moves = ("Pan Left", "Pan Right", "Tilt Up", "Tilt Down")
    config.fixed_camera_options = True
    config.frames = 8  # frames per scene and per sample
    config.image_size = 112  # rendered frame side, pixels
    config.tokenizer_vocab_size = 800  # ordinary BPE tokens; special tokens come on top
    config.eval_max_new_tokens = 160  # room for a camera trace (about 70 tokens) with its imagery blocks
    config.eval_batch_size = 16

    # The reading warm-up: letter-only answers to camera questions, before DIFT. With fixed options a
    # small model reads the camera's motion from the video after about 8,000 camera examples
    # (docs/LEARNING.md); DIFT then starts from a model that reads. The blind control gets the same
    # warm-up without video. total_steps = 0 leaves it out.
    config.warmup = stage_config("dift", arg)
    config.warmup.data.assistant = "answer"
    config.warmup.data.subtasks = ("camera_motion",)
    config.warmup.data.batch_size = 32
    config.warmup.data.seq_buckets = (128, 256)  # blind / with video
    config.warmup.optim.total_steps = 400
    config.warmup.optim.freeze = ()
    config.warmup.train.checkpoint_every = 400

    config.dift = stage_config("dift", arg)  # data and tokenizer are the demo's
    config.dift.optim.total_steps = 600
    config.dift.train.checkpoint_every = 300
    config.dift.data.seq_buckets = (256, 384)  # blind / with video (camera traces)
    # The tower trains from scratch; its imagery targets come from a frozen copy of its initial weights.
    config.dift.optim.freeze = ()
    config.dift.loss.imagery_tower = "initial"

    config.rl = stage_config("rl", arg)  # starts from the DIFT checkpoint
    config.rl.optim.total_steps = 60
    config.rl.train.checkpoint_every = 60
    config.rl.sample.max_new_tokens = 160
    return config
