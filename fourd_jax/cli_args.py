"""The grammar of `fourd-jax`: every subcommand, its arguments, their types, defaults and help.

Only argparse here; `fourd_jax.cli` dispatches each parsed command (`args.handler`) to its code.
Numbers are range-checked as they are parsed, and a refused command line is one line on stderr.
"""

from __future__ import annotations

import argparse

BENCHMARKS = ("forward", "data", "train", "sample", "rl")
IMPORT_FORMATS = ("4dthinker", "dsr", "dsr_bench", "vlm4d", "mllm4d")
CONFIG_FLAGS = "--config NAME[:ARG] (a packaged config) or PATH[:ARG] (a config file), and --config.KEY=VALUE"


class UsageError(Exception):
    """A command line argparse refuses; `cli.main` prints it as one line and returns 2."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (`prog: error: message`), like every other bad input."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: error: {message}")


class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows each flag's default, except where there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, "") or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def whole_number(minimum: int):
    """An argparse type: an int >= minimum, or one sentence saying what the flag must be."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {minimum}, not {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {minimum}, not {value}")
        return value
    return parse


def positive_number(text: str) -> float:
    """An argparse type: a float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, not {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, not {value}")
    return value


def _commands(parser: argparse.ArgumentParser, dest: str):
    return parser.add_subparsers(dest=dest, required=True, metavar="{" + dest + "}")


def _group(sub, name: str, help: str, dest: str):
    """A command whose subcommands (stored in `args.<dest>`) carry the flags."""
    return _commands(sub.add_parser(name, help=help, formatter_class=Formatter), dest)


def _add(commands, name: str, help: str, handler: str, description: str | None = None,
         takes_config: bool = False, config_file: bool = True) -> argparse.ArgumentParser:
    """A subcommand run by `handler`. `takes_config`: it reads --config.KEY=VALUE overrides (and, with
    `config_file`, --config NAME|PATH[:ARG]), which `cli.parse_config` parses from the rest of argv."""
    parser = commands.add_parser(name, help=help, description=description or help, formatter_class=Formatter)
    parser.set_defaults(handler=handler, takes_config=takes_config, config_file=takes_config and config_file)
    return parser


def _convert(sub) -> None:
    directions = _group(sub, "convert", "convert checkpoints between Hugging Face and Orbax", "direction")
    to_jax = _add(directions, "hf-to-jax", "a Hugging Face directory -> an Orbax checkpoint (step 0)", "convert")
    to_jax.add_argument("src", help="the Hugging Face directory (config.json + safetensors)")
    to_jax.add_argument("dst", help="the Orbax checkpoint directory to write")
    to_jax.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="dtype the parameters are stored in")
    to_hf = _add(directions, "jax-to-hf", "an Orbax checkpoint or training workdir -> a Hugging Face directory",
                 "convert")
    to_hf.add_argument("src", help="an Orbax checkpoint directory or a training workdir")
    to_hf.add_argument("dst", help="the Hugging Face directory to write")
    to_hf.add_argument("--step", type=whole_number(0), default=None, help="checkpoint step (default: the latest)")
    to_hf.add_argument("--tokenizer", default=None, help="tokenizer directory to copy into the output (default: "
                                                         "the one beside the checkpoint, if any)")
    to_hf.add_argument("--max-shard-size", default="5GB", help="largest safetensors file")
    to_hf.add_argument("--adapter", action="store_true",
                       help="write a LoRA run's adapters as a PEFT adapter directory (adapter_config.json, "
                            "adapter_model.safetensors) instead of the merged model; the base goes to DST/base "
                            "unless --base-name is given")
    to_hf.add_argument("--base-name", default=None,
                       help="with --adapter: the base_model_name_or_path to record (an HF directory or hub name) "
                            "instead of writing the base")


def _bench(sub) -> None:
    what = _group(sub, "bench", "benchmarks against PyTorch, recorded in docs/PERFORMANCE.md", "what")
    helps = {"forward": "one jitted forward vs transformers", "data": "renderer and input pipeline throughput",
             "train": "one DIFT step vs the same step in PyTorch", "sample": "greedy tokens/s vs transformers generate",
             "rl": "one GRPO step vs the same step in PyTorch"}
    for name in BENCHMARKS:
        one = _add(what, name, helps[name], "bench")
        if name != "data":
            accelerator_sizes = ["1b"] if name in ("train", "sample") else []
            one.add_argument("--size", default="small", choices=["small", "tiny", *accelerator_sizes],
                             help="model size (1b: for an accelerator)")
        if name == "train":
            one.add_argument("--examples", type=whole_number(2), default=2,
                             help="examples per step, an even number (JAX packs two to a row)")
        if name in ("train", "sample"):
            one.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                             help="what both frameworks compute in (train keeps float32 weights and optimizer)")
        if name == "forward":
            one.add_argument("--family", default="qwen2_5_vl", choices=["qwen2_5_vl", "qwen3_vl"],
                             help="the architecture of both models")
        if name == "sample":
            one.add_argument("--rows", type=whole_number(4), default=4,
                             help="rows decoded together, a multiple of 4: 4 prompts x G = rows / 4 samples each "
                                  "(e.g. 32: an RL rollout batch with G = 8)")
        if name != "data":
            one.add_argument("--repeats", type=whole_number(1), default=5, help="timed repetitions (median reported)")
        one.add_argument("--no-record", action="store_true", help="print only, do not write docs/PERFORMANCE.md")


def _synth(sub) -> None:
    synth = _add(sub, "synth", "render procedural 4D scenes and write question records", "synth")
    synth.add_argument("--out", required=True, help="a new or empty directory for train/, val/, test/, manifest.json")
    synth.add_argument("--num-scenes", type=whole_number(1), required=True, help="scenes to render")
    synth.add_argument("--seed", type=int, default=0, help="the run's seed (scene i gets its own from it)")
    synth.add_argument("--workers", type=whole_number(1), default=1, help="worker processes")
    synth.add_argument("--frames", type=whole_number(1), default=16, help="frames per scene")
    synth.add_argument("--fps", type=positive_number, default=2.0, help="frames per second of the scenes' time")
    synth.add_argument("--image-size", type=whole_number(1), default=224, help="square frame side in pixels")
    synth.add_argument("--families", default="dsr,4dthinker,mllm4d", help="comma-separated question families")
    synth.add_argument("--scenes-per-shard", type=whole_number(1), default=25, help="scenes per ArrayRecord file")
    synth.add_argument("--overwrite", action="store_true",
                       help="replace an earlier synth output in --out (otherwise --out must be new or empty)")


def _data(sub) -> None:
    action = _group(sub, "data", "inspect or import 4D records, or precompute their DIFT imagery targets", "action")
    inspect = _add(action, "inspect", "counts per sub-task, letter balance, bad records, and a contact sheet", "data")
    inspect.add_argument("path", help="records: a file or a directory")
    inspect.add_argument("--sheet", default=None, help="contact sheet PNG path (default: PATH_sample.png)")
    imports = _add(action, "import", "released 4DThinker / DSR / DSR-Bench / VLM4D files -> one records file", "data")
    imports.add_argument("path", help="the source data file (JSON, JSON lines or parquet)")
    imports.add_argument("--format", required=True, choices=IMPORT_FORMATS, help="the source's layout")
    imports.add_argument("--out", required=True, help="the .array_record file to write")
    imports.add_argument("--root", default=None, help="directory media paths are relative to (default: the source "
                                                      "file's directory)")
    imports.add_argument("--max-frames", type=whole_number(1), default=None,
                         help="frames kept per video (default: the format's)")
    imports.add_argument("--strict", action="store_true", help="stop at the first bad row instead of skipping it")
    targets = _add(action, "targets", "write DIFT imagery targets into records, computed once", "data")
    targets.add_argument("path", help="records: a file or a directory")
    targets.add_argument("--checkpoint", required=True, help="the HF or Orbax checkpoint (or workdir) DIFT starts from")
    targets.add_argument("--out", required=True, help="the directory to write the records with targets to")
    targets.add_argument("--latent-size", type=whole_number(1), default=4, help="latent pads per imagery image")
    targets.add_argument("--imagery-max-pixels", type=whole_number(1), default=256 * 28 * 28,
                         help="imagery resize bound (as data.imagery_max_pixels in the DIFT config)")


def _training(sub) -> None:
    dift = _add(sub, "dift", "Dynamic-Imagery Fine-Tuning (resumes from WORKDIR)", "dift",
                f"Dynamic-Imagery Fine-Tuning, resumed from WORKDIR. Also: {CONFIG_FLAGS} (default config: dift).",
                takes_config=True)
    dift.add_argument("--workdir", required=True, help="checkpoints, metrics, tokenizer and manifest go here")
    dift.add_argument("--data", default=None, help="records with a train/ split (default: config.data.path)")
    dift.add_argument("--steps", type=whole_number(1), default=None,
                      help="train until this global step (default: config.optim.total_steps)")
    rl = _add(sub, "rl", "4DRL: GRPO on text tokens from a DIFT run (resumes from WORKDIR)", "rl",
              f"4DRL (GRPO) from a DIFT run, resumed from WORKDIR. Also: {CONFIG_FLAGS} (default config: rl).",
              takes_config=True)
    rl.add_argument("--workdir", required=True, help="checkpoints, metrics, tokenizer and manifest go here")
    rl.add_argument("--init", default=None, help="the DIFT workdir, or a checkpoint / HF directory "
                                                 "(default: config.model.init_from)")
    rl.add_argument("--data", default=None, help="records with a train/ split (default: the records the --init run "
                                                 "trained on)")
    rl.add_argument("--steps", type=whole_number(1), default=None,
                    help="train until this global step (default: config.optim.total_steps)")


def _compile(sub) -> None:
    aot = _add(sub, "compile", "compile a run's programs ahead of time for a TPU slice (on any host)", "compile",
               "Lower and compile the DIFT step, the GRPO update or the sampler of a config for a TPU topology, on "
               "this host (libtpu describes the chips), and report per-device HBM, FLOPs and replication. Fails in "
               "one sentence when the program does not fit or too much of the state is replicated. Also: "
               f"{CONFIG_FLAGS} (default config: dift; without a mesh in --config, the topology's mesh preset).",
               takes_config=True)
    aot.add_argument("--topology", required=True, metavar="NAME",
                     help="the TPU slice as gcloud names its accelerator type, e.g. v5e-16, v5p-64, v6e-256 "
                          "(fourd_jax/aot.py SLICES)")
    aot.add_argument("--stage", choices=("dift", "rl", "sample"), default=None,
                     help="the program: dift (training step), rl (GRPO update) or sample (the rollout sampler) "
                          "(default: dift for a dift config, rl for an rl config)")
    aot.add_argument("--mfu", type=positive_number, default=0.4, help="model-FLOPs utilisation for the step time")
    aot.add_argument("--max-replicated", type=positive_number, default=0.02,
                     help="the largest fraction of parameter and optimizer bytes allowed whole on every device")
    aot.add_argument("--json", default="", help="also write the report as JSON to this file")


def _eval(sub) -> None:
    ev = _add(sub, "eval", "accuracy per sub-task of a checkpoint on a records split", "eval")
    ev.add_argument("--checkpoint", required=True, help="a training workdir, Orbax checkpoint or HF directory")
    ev.add_argument("--data", required=True, help="records: a directory with splits (see --split), or a directory "
                                                  "or file of records")
    ev.add_argument("--split", default="test", choices=["train", "val", "test"],
                    help="the split scored when --data holds splits")
    ev.add_argument("--out", required=True, help="where results.json, results.csv, predictions.jsonl and "
                                                 "accuracy.png go")
    ev.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the one saved with the "
                                                      "checkpoint)")
    ev.add_argument("--batch-size", type=whole_number(1), default=8, help="questions per generation batch")
    ev.add_argument("--max-new-tokens", type=whole_number(1), default=64, help="generation length limit")
    ev.add_argument("--max-frames", type=whole_number(1), default=16, help="frames shown per video")
    ev.add_argument("--max-pixels", type=whole_number(1), default=448 * 448, help="per frame, after smart_resize")
    ev.add_argument("--max-samples", type=whole_number(0), default=0,
                    help="score the first N records only (0: all)")
    ev.add_argument("--blind", action="store_true",
                    help="show no video (the blind control: for a model trained with --config.data.video=False)")


def _jobs(sub) -> None:
    plot = _add(sub, "plot", "training curves of a WORKDIR as PNG", "plot")
    plot.add_argument("workdir", help="a training workdir (its metrics.jsonl)")
    demo = _add(sub, "demo", "the end-to-end job on a tiny model, on CPU", "demo",
                "Synthesise scenes, train a tiny VLM from scratch (a letter-only reading warm-up, DIFT, 4DRL) and "
                "the blind control (the same training with no video: whatever it reaches is answer bias), evaluate "
                f"all three on held-out scenes. Also: {CONFIG_FLAGS} (default config: demo).", takes_config=True)
    demo.add_argument("--workdir", default="workdir_demo", help="where every stage's output goes")
    probe = _add(sub, "probe", "can the camera's motion be read from the video? (linear probes, no LM)", "probe")
    probe.add_argument("data", help="records from fourd-jax synth (train/, val/ and test/ are used)")
    probe.add_argument("--preset", default="tiny", help="the model preset whose vision tower is probed")
    probe.add_argument("--steps", type=whole_number(1), default=1000, help="training steps of the trained-tower reader")
    probe.add_argument("--seed", type=int, default=0, help="seed of the towers and readers")
    probe.add_argument("--out", default="", help="write the results as JSON here")
    study = _add(sub, "study", "the ablations (text SFT, DIFT, no latent loss, text-only vs full-token 4DRL, blind)",
                 "study", "Every arm on the same data, model and budget (the supervised arms from one reading "
                 "warm-up); writes W/study.json, study.csv and PNG plots. Arms: text_sft, dift, dift_no_latent, "
                 "rl_text, rl_full, blind (the same training with no video: whatever it reaches is answer bias). "
                 "Also: --config.KEY=VALUE.", takes_config=True, config_file=False)
    study.add_argument("--preset", choices=["cpu", "accelerator"], default="cpu",
                       help="cpu: <= 90 min on 2 cores for one seed; accelerator: sized for one GPU or TPU host")
    study.add_argument("--workdir", required=True, help="where every arm's output and the report go")
    study.add_argument("--seeds", type=whole_number(1), default=1, help="seeds (data and initialisation) per arm")
    study.add_argument("--arms", default="", help="comma-separated subset of the arms (default: all)")


def build_parser() -> argparse.ArgumentParser:
    """The `fourd-jax` parser; a parsed command carries `handler` (what runs it) and `takes_config`."""
    parser = Parser(prog="fourd-jax", description="JAX/Flax 4DThinker: Qwen2.5-VL that thinks with 4D imagery.",
                    formatter_class=Formatter)
    sub = _commands(parser, "command")
    for add in (_convert, _bench, _synth, _data, _training, _compile, _eval, _jobs):
        add(sub)
    return parser
