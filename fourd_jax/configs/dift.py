"""DIFT (Dynamic-Imagery Fine-Tuning) runs: `fourd-jax dift --config dift:PRESET`.

Presets: tiny (CPU demo and tests), qwen25vl_3b, qwen25vl_7b (the 4DThinker recipe, SPEC 3.3), and
the same recipe on Qwen3-VL: qwen3vl_2b, qwen3vl_4b, qwen3vl_8b.
A mesh preset can follow a comma: `dift:qwen25vl_7b,v5p-64`. Any field can be
overridden with --config.FIELD=VALUE.
"""

import ml_collections

from fourd_jax.errors import InputError

# (data, fsdp, tensor) per hardware slice; -1 = all remaining devices.
MESHES = {
    "cpu": (1, -1, 1),
    # v5e chips hold 16 GiB: the 7B recipe's one 8K-token sequence per chip needs its activations split
    # over 2 chips by tensor parallelism (docs/SCALE.md). On v6e-256 every tensor-1 mesh compiled to
    # 60-71 GiB of temporaries per chip (v6e-64's (8, 8, 1) needs 27): tensor 2 fits there too.
    "v5e-8": (1, 4, 2), "v5e-16": (1, 8, 2), "v5e-64": (4, 8, 2), "v5e-256": (16, 8, 2),
    "v5p-8": (1, 4, 1), "v5p-32": (2, 8, 1), "v5p-64": (4, 8, 1), "v5p-128": (8, 8, 1),
    "v6e-8": (1, 8, 1), "v6e-16": (2, 8, 1), "v6e-64": (8, 8, 1), "v6e-256": (16, 8, 2),
    "8xh100": (1, 8, 1), "16xh100": (2, 8, 1),
}


QWEN3VL_PRESETS = ("qwen3vl_2b", "qwen3vl_4b", "qwen3vl_8b")
RECIPE_PRESETS = ("qwen25vl_3b", "qwen25vl_7b", *QWEN3VL_PRESETS)


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    preset, _, mesh = arg.partition(",")
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.preset = preset  # a model preset of any family (fourd_jax.families.preset_names)
    c.model.init_from = ""  # "" = random init; an HF directory, an Orbax checkpoint or a training workdir
    c.model.dtype = "float32"  # compute dtype
    c.model.param_dtype = "float32"  # master weights
    c.model.remat_policy = "none"
    c.model.attention_block = 0  # decoder attention in tiles of this many queries x keys; 0 = dense

    c.tokenizer = ""  # "" = train the offline BPE on the data (saved to WORKDIR/tokenizer)
    c.tokenizer_vocab_size = 800

    c.data = ml_collections.ConfigDict()
    c.data.path = ""  # records from `fourd-jax synth` or `data import` (train/ is used); or pass --data
    c.data.batch_size = 8  # global
    c.data.seq_buckets = (512, 1024)
    c.data.max_frames = 8
    c.data.video_max_pixels = 112 * 112
    c.data.imagery_max_pixels = 112 * 112
    c.data.num_workers = 0
    c.data.skip_bad_records = True
    c.data.latent_size = 4
    # The supervised assistant turn: "imagery_trace" (DIFT), "text_trace" (no latent blocks) or "answer".
    c.data.assistant = "imagery_trace"
    c.data.video = True  # False: the blind control (question and options only, no video tokens)
    c.data.subtasks = ()  # keep only records of these sub-tasks, e.g. ("camera_motion",); () = all
    # > 0: each batch's batch_size examples are packed into this many rows (docs/DATA.md, Packing).
    c.data.packed_rows = 0

    # LoRA (docs/TRAINING.md): rank 0 = off (the whole model trains, minus optim.freeze). rank > 0 freezes
    # every base parameter and trains adapters on the linear kernels `targets` matches (re.search on the path).
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0
    c.lora.alpha = 16.0  # the update is alpha / rank · B A
    c.lora.dropout = 0.0  # on the adapter path's inputs, while training
    c.lora.targets = r"^language_model/layers/.*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel$"
    c.lora.base_dtype = ""  # the frozen base's dtype: "" = model.param_dtype, or "bfloat16" to halve it

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 2e-3
    c.optim.min_lr_ratio = 0.1
    c.optim.warmup_steps = 10
    c.optim.total_steps = 300  # schedule length; training stops at --steps (default: this)
    c.optim.weight_decay = 0.01
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.clip_norm = 1.0
    c.optim.grad_accum = 1
    c.optim.freeze = (r"^visual/",)  # regexes over parameter paths: the vision tower and merger

    c.loss = ml_collections.ConfigDict()
    c.loss.ce_weight = 0.1
    c.loss.latent_weight = 1.0
    # "in_step": imagery images through the frozen vision tower inside each step; "precomputed": the
    # records' imagery_targets (fourd-jax data targets, with the checkpoint of model.init_from).
    c.loss.imagery_targets = "in_step"
    # The tower that makes in-step targets: "live" (the model's own, frozen by optim.freeze) or "initial"
    # (a frozen copy of the tower the run started from; use it when the tower trains).
    c.loss.imagery_tower = "live"

    c.train = ml_collections.ConfigDict()
    c.train.checkpoint_every = 50  # also when the validation loss is computed
    c.train.keep_checkpoints = 3
    c.train.eval_batches = 4  # validation batches (from the data's val/ split); 0 = no validation
    c.train.best_metric = "val_loss"  # the checkpoint kept besides the last ones; "" = none
    c.train.max_nonfinite = 5
    c.train.peak_flops = 0.0  # per device, for MFU; 0 = look the device kind up

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (1, -1, 1)  # (data, fsdp, tensor)
    # (logical name, mesh axes) pairs replacing entries of fourd_jax.sharding.DEFAULT_RULES, e.g.
    # (("mlp", ("fsdp", "tensor")),); () = the default table.
    c.mesh.rules = ()

    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator = ""  # "host:port" for an explicit cluster (e.g. CPU processes)
    c.distributed.num_processes = 1
    c.distributed.process_id = 0

    if preset in RECIPE_PRESETS:  # the 4DThinker DIFT recipe
        c.model.dtype = "bfloat16"
        c.model.remat_policy = "nothing_saveable"
        c.model.attention_block = 512  # 8K-token buckets: 512 x 512 tiles, those the mask empties skipped
        c.data.path = "data/dift"
        c.data.batch_size = 8
        # 50 frames at 256*28*28 pixels are 6400 video tokens: every sample fits 8192 (fourd-jax compile checks).
        c.data.seq_buckets = (2048, 4096, 8192)
        c.data.max_frames = 50
        c.data.video_max_pixels = 256 * 28 * 28
        c.data.imagery_max_pixels = 256 * 28 * 28
        c.data.num_workers = 8
        c.optim.lr = 1e-5
        c.optim.min_lr_ratio = 0.0
        c.optim.warmup_steps = 10
        c.optim.total_steps = 4750  # 1 epoch of ~38K samples at batch 8
        c.train.checkpoint_every = 500
        c.mesh.shape = MESHES["v5p-8"]
        if preset in QWEN3VL_PRESETS:
            # Qwen3-VL frames are resized to multiples of 32 px (16 px patches, 2 x 2 merged): the same 256
            # merged tokens per temporal patch are 256 * 32 * 32 pixels. 50 frames are 25 temporal patches of
            # 256 tokens, each after a "<t seconds>" timestamp: about 6600 tokens, within 8192.
            c.data.video_max_pixels = 256 * 32 * 32
            c.data.imagery_max_pixels = 256 * 32 * 32
    elif preset != "tiny":
        raise InputError(f"unknown preset {preset!r}; choose tiny or one of {', '.join(RECIPE_PRESETS)}.")
    if mesh:
        for_slice(c, mesh)
    return c


def for_slice(c: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """The config's choices for a slice (a `MESHES` name): its mesh."""
    if name not in MESHES:
        raise InputError(f"unknown mesh preset {name!r}; choose from {sorted(MESHES)}.")
    c.mesh.shape = MESHES[name]
    return c
