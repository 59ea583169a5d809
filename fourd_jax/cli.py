"""`fourd-jax`: one entry point, subcommands. Parsing and dispatch only; the work is elsewhere."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

from absl import flags
from ml_collections import config_flags

from fourd_jax.errors import InputError


class UsageError(Exception):
    """A command line argparse refuses; `main` prints it as one line and returns 2."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (`prog: error: message`), like every other bad input."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: error: {message}")


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


def _module(name: str) -> Any:
    """A fourd_jax module, imported when its subcommand runs: `fourd-jax synth`, `data inspect` and
    `data import` then load no JAX, and each command pays only for its own stack."""
    return importlib.import_module(f"fourd_jax.{name}")


def _convert(args: argparse.Namespace) -> None:
    load, hf, checkpoint = _module("load"), _module("convert.hf"), _module("checkpoint")
    source = load.find_model(args.src, what="src")
    wanted = "hf" if args.direction == "hf-to-jax" else "orbax"
    if source.kind != wanted:  # refused before anything is read
        raise InputError(f"src {args.src} is {'a Hugging Face' if source.kind == 'hf' else 'an Orbax'} "
                         f"directory; {args.direction} reads {'a Hugging Face' if wanted == 'hf' else 'an Orbax'} one.")
    loaded = load.load_model(source, what="src", step=args.step,
                             param_dtype=args.dtype if args.direction == "hf-to-jax" else None)
    if args.direction == "hf-to-jax":
        out = checkpoint.save_params(args.dst, loaded.model, loaded.params)
        print(f"wrote Orbax checkpoint {out} (step 0) from {args.src}")
    else:
        tokenizer_dir = args.tokenizer or source.tokenizer  # a training workdir's own, unless one is given
        tokenizer = load.load_tokenizer(tokenizer_dir) if tokenizer_dir else None
        out = hf.save(loaded.model, loaded.params, args.dst, tokenizer=tokenizer, max_shard_size=args.max_shard_size)
        print(f"wrote Hugging Face checkpoint {out} from {args.src}")


def _bench(args: argparse.Namespace) -> None:
    bench = _module(f"bench.{args.what}")
    if args.what == "data":
        bench.run(record=not args.no_record)
    elif args.what == "train":
        bench.run(repeats=args.repeats, record=not args.no_record)
    else:
        bench.run(size=args.size, repeats=args.repeats, record=not args.no_record)


def _synth(args: argparse.Namespace) -> None:
    scene_module, synth = _module("data.sim.scene"), _module("data.synth")
    scene = scene_module.SceneConfig(num_frames=args.frames, fps=args.fps, image_size=(args.image_size,) * 2)
    config = synth.SynthConfig(scene=scene, families=tuple(args.families.split(",")),
                               scenes_per_shard=args.scenes_per_shard)
    manifest = synth.synthesize(args.out, args.num_scenes, args.seed, config, workers=args.workers,
                                overwrite=args.overwrite)
    counts = ", ".join(f"{split} {info['records']}" for split, info in manifest["splits"].items())
    print(f"wrote {args.num_scenes} scenes to {args.out}: records {counts}")


def _data(args: argparse.Namespace) -> None:
    if args.action == "inspect":
        inspect = _module("data.inspect")
        summary = inspect.summarize(args.path)
        sheet_path = args.sheet or f"{args.path.rstrip('/')}_sample.png"
        sheet = inspect.contact_sheet(inspect.first_sample(args.path), sheet_path)
        print(json.dumps(summary, indent=2))
        print(f"contact sheet: {sheet}")
    elif args.action == "targets":
        if not (args.out and args.checkpoint):
            raise InputError("data targets needs --checkpoint (HF or Orbax directory) and --out DIR.")
        loaded = _module("load").load_model(args.checkpoint)
        features = _module("data.features").FeatureConfig(latent_size=args.latent_size,
                                                          imagery_max_pixels=args.imagery_max_pixels)
        count = _module("data.targets").write_imagery_targets(args.path, args.out, loaded.model, loaded.params,
                                                              features)
        print(f"wrote {args.out} with imagery targets for {count} records")
    else:
        if not args.out:
            raise InputError("data import needs --out FILE.array_record.")
        stats = _module("data.importers").import_to_records(args.format, args.path, args.out, root=args.root,
                                                            max_frames=args.max_frames,
                                                            skip_bad_records=not args.strict)
        print(stats.summary())
        for line in stats.first_skipped:
            print(f"  skipped {line}")


def _train(args: argparse.Namespace, stage: str) -> None:
    """`fourd-jax dift` / `rl`: the config validated into typed settings, the cluster joined, the stage run."""
    config = parse_config(f"fourd-jax {stage}", args.config_args, stage)
    settings = _module("train.settings").RunSettings.of(config)
    _module("distributed").initialize(config.distributed)
    extra = {"init": args.init} if stage == "rl" else {}
    state = _module(f"train.{stage}").train(settings, args.workdir, data=args.data, steps=args.steps, **extra)
    print(f"trained to step {int(state.step)}; checkpoints in {args.workdir}/checkpoints")


def _eval(args: argparse.Namespace) -> None:
    evaluate, report = _module("eval.evaluate"), _module("eval.report")
    config = evaluate.EvalConfig(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                 max_frames=args.max_frames, video_max_pixels=args.max_pixels,
                                 max_samples=args.max_samples, video=not args.blind)
    table = evaluate.evaluate(args.checkpoint, args.data, args.out, config, tokenizer_dir=args.tokenizer,
                              split=args.split)
    print(report.compare_table({"accuracy": table}))
    print(f"wrote {args.out}/results.json, results.csv, predictions.jsonl, accuracy.png")


def _plot(args: argparse.Namespace) -> None:
    for path in _module("train.plot").plot_metrics(args.workdir):
        print(f"wrote {path}")


def _demo(args: argparse.Namespace) -> None:
    _module("demo").run(args.workdir, parse_config("fourd-jax demo", args.config_args, "demo"))


def _probe(args: argparse.Namespace) -> None:
    results = _module("probe").run(args.data, preset=args.preset, steps=args.steps, seed=args.seed)
    for reader in ("pixel_differences", "random_tower", "trained_tower"):
        r = results[reader]
        print(f"{reader:<18} {r['accuracy']:.1%} [{r['ci'][0]:.1%}, {r['ci'][1]:.1%}] of {r['n']} camera questions "
              f"(chance 25%); per-parameter accuracy {r['per_parameter']}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


def _study(args: argparse.Namespace) -> None:
    study = _module("study")
    config = parse_config("fourd-jax study", [f"--config=study:{args.preset}", *args.config_args], "study")
    arms = tuple(a for a in args.arms.split(",") if a) if args.arms else study.ARMS
    study.run(args.workdir, config, seeds=args.seeds, arms=arms)


PACKAGED_CONFIGS = Path(__file__).parent / "configs"


def config_file(spec: str) -> str:
    """`NAME[:ARG]` for a config shipped with the package (`dift`, `rl`, `demo`, `study`), which works
    from any directory, or `PATH[:ARG]` for a config file; one sentence when it is neither."""
    name, sep, arg = spec.partition(":")
    packaged = PACKAGED_CONFIGS / f"{name}.py"
    if name and "/" not in name and not name.endswith(".py") and packaged.is_file():
        return f"{packaged}{sep}{arg}"
    if not Path(name).is_file():
        known = sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.py") if p.stem != "__init__")
        raise InputError(f"config {name!r} is neither a config file nor one of the packaged configs {known}.")
    return spec


def with_config_files(argv: list[str]) -> list[str]:
    """argv with each `--config SPEC` / `--config=SPEC` value resolved by `config_file`."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" and i + 1 < len(argv):
            out += [arg, config_file(argv[i + 1])]
            i += 2
            continue
        out.append(f"--config={config_file(arg.split('=', 1)[1])}" if arg.startswith("--config=") else arg)
        i += 1
    return out


def parse_config(prog: str, argv: list[str], default: str):
    """An ml_collections config from `--config NAME|PATH[:arg]` (default: the packaged config
    `default`) and `--config.key=value` overrides; bad input is one sentence."""
    values = flags.FlagValues()
    argv = [prog, *with_config_files(argv)]
    try:
        # Overrides are read from argv when the flag is defined, so both steps can refuse input.
        config_flags.DEFINE_config_file("config", config_file(default), "config file: NAME|PATH[:arg]",
                                        flag_values=values, sys_argv=argv)
        values(argv)
    except (AttributeError, KeyError) as e:
        # ml_collections raises AttributeError(KeyError("'name'\nDid you mean ...?")) for an unknown field.
        key = e.args[0] if e.args and isinstance(e.args[0], KeyError) else e
        field, _, hint = str(key.args[0] if key.args else key).partition("\n")
        hint = f" {hint.strip()}" if hint.strip() else ""
        raise InputError(f"the config has no field {field.strip(chr(39))!r} (from a --config.KEY override).{hint}"
                         ) from None
    except flags.Error as e:
        # A config's own InputError (an unknown preset or mesh) is the innermost of the exceptions absl and
        # ml_collections wrap it in; its sentence is what the user needs.
        cause, inner = e, e.__context__
        while inner is not None:
            cause = inner if isinstance(inner, InputError) else cause
            inner = inner.__context__
        raise InputError(str(cause).splitlines()[0]) from None
    return values.config


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="fourd-jax",
        description="JAX/Flax 4DThinker: Qwen2.5-VL that thinks with 4D imagery.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    convert = sub.add_parser("convert", help="convert checkpoints between Hugging Face and Orbax")
    convert.add_argument("direction", choices=["hf-to-jax", "jax-to-hf"])
    convert.add_argument("src", help="HF directory (hf-to-jax), or an Orbax checkpoint directory or training "
                                     "workdir (jax-to-hf)")
    convert.add_argument("dst", help="output directory")
    convert.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                         help="parameter dtype when reading HF weights")
    convert.add_argument("--step", type=whole_number(0), default=None, help="checkpoint step (default: latest)")
    convert.add_argument("--tokenizer", default=None, help="tokenizer directory to copy into the HF output "
                                                             "(default: the one beside the checkpoint, if any)")
    convert.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (e.g. 5GB)")
    convert.set_defaults(func=_convert)

    bench = sub.add_parser("bench", help="benchmarks against PyTorch, recorded in docs/PERFORMANCE.md")
    bench.add_argument("what", choices=["forward", "data", "train", "sample", "rl"])
    bench.add_argument("--size", default="small", choices=["small", "tiny"])
    bench.add_argument("--repeats", type=whole_number(1), default=5)
    bench.add_argument("--no-record", action="store_true", help="print only, do not write docs/")
    bench.set_defaults(func=_bench)

    synth = sub.add_parser("synth", help="render procedural 4D scenes and write question records")
    synth.add_argument("--out", required=True, help="output directory (train/, val/, test/, manifest.json)")
    synth.add_argument("--num-scenes", type=whole_number(1), required=True)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--workers", type=whole_number(1), default=1, help="worker processes")
    synth.add_argument("--frames", type=whole_number(1), default=16, help="frames per scene")
    synth.add_argument("--fps", type=positive_number, default=2.0)
    synth.add_argument("--image-size", type=whole_number(1), default=224, help="square frame side in pixels")
    synth.add_argument("--families", default="dsr,4dthinker,mllm4d", help="comma-separated question families")
    synth.add_argument("--scenes-per-shard", type=whole_number(1), default=25)
    synth.add_argument("--overwrite", action="store_true",
                       help="replace an earlier synth output in --out (default: --out must be new or empty)")
    synth.set_defaults(func=_synth)

    data = sub.add_parser("data", help="inspect or import 4D records, or precompute their DIFT imagery targets")
    data.add_argument("action", choices=["inspect", "import", "targets"])
    data.add_argument("path", help="inspect/targets: records (file or directory); import: the source file")
    data.add_argument("--sheet", default=None, help="inspect: contact sheet PNG path")
    data.add_argument("--format", choices=["4dthinker", "dsr", "dsr_bench", "vlm4d"], help="import: source format")
    data.add_argument("--out", default=None, help="import: output .array_record file")
    data.add_argument("--root", default=None, help="import: directory media paths are relative to")
    data.add_argument("--max-frames", type=whole_number(1), default=None, help="import: frames kept per video")
    data.add_argument("--strict", action="store_true", help="import: stop at the first bad row instead of skipping")
    data.add_argument("--checkpoint", default=None, help="targets: the HF or Orbax checkpoint DIFT starts from")
    data.add_argument("--latent-size", type=whole_number(1), default=4, help="targets: latent pads per imagery image")
    data.add_argument("--imagery-max-pixels", type=whole_number(1), default=256 * 28 * 28,
                      help="targets: imagery resize bound (as data.imagery_max_pixels in the DIFT config)")
    data.set_defaults(func=_data)

    dift = sub.add_parser("dift", help="Dynamic-Imagery Fine-Tuning (resumes from WORKDIR)",
                          description="Flags after the named ones: --config dift[:PRESET[,MESH]] (or a config file), "
                                      "--config.KEY=VALUE.")
    dift.add_argument("--workdir", required=True)
    dift.add_argument("--data", default=None, help="records from fourd-jax synth (default: config.data.path)")
    dift.add_argument("--steps", type=whole_number(1), default=None, help="train until this global step")
    dift.set_defaults(func=lambda a: _train(a, "dift"), takes_config=True)

    rl = sub.add_parser("rl", help="4DRL: GRPO on text tokens from a DIFT run (resumes from WORKDIR)",
                        description="Flags after the named ones: --config rl[:PRESET[,MESH]] (or a config file), "
                                    "--config.KEY=VALUE.")
    rl.add_argument("--workdir", required=True)
    rl.add_argument("--init", default=None, help="the DIFT workdir, or a checkpoint / HF directory "
                                                 "(default: config.model.init_from)")
    rl.add_argument("--data", default=None, help="records with a train/ split (default: the DIFT run's data)")
    rl.add_argument("--steps", type=whole_number(1), default=None, help="train until this global step")
    rl.set_defaults(func=lambda a: _train(a, "rl"), takes_config=True)

    ev = sub.add_parser("eval", help="accuracy per sub-task of a checkpoint on a records split")
    ev.add_argument("--checkpoint", required=True, help="a training workdir, Orbax checkpoint or HF directory")
    ev.add_argument("--data", required=True, help="records: a directory with splits (see --split), or a directory "
                                                  "or file of records")
    ev.add_argument("--split", default="test", choices=["train", "val", "test"],
                    help="the split scored when --data holds splits (default: test)")
    ev.add_argument("--out", required=True, help="where results.json, results.csv and accuracy.png go")
    ev.add_argument("--tokenizer", default=None, help="default: the one saved with the checkpoint")
    ev.add_argument("--batch-size", type=whole_number(1), default=8)
    ev.add_argument("--max-new-tokens", type=whole_number(1), default=64)
    ev.add_argument("--max-frames", type=whole_number(1), default=16)
    ev.add_argument("--max-pixels", type=whole_number(1), default=448 * 448, help="per frame, after smart_resize")
    ev.add_argument("--max-samples", type=whole_number(0), default=0, help="0 = all")
    ev.add_argument("--blind", action="store_true",
                    help="show no video (the blind control: for a model trained with --config.data.video=False)")
    ev.set_defaults(func=_eval)

    plot = sub.add_parser("plot", help="training curves of a WORKDIR as PNG")
    plot.add_argument("workdir")
    plot.set_defaults(func=_plot)

    demo = sub.add_parser("demo", help="the end-to-end job on a tiny model, on CPU",
                          description="Synthesise scenes, train a tiny VLM from scratch (a letter-only reading warm-up,"
                                      " DIFT, 4DRL) and the blind control (the same training with no video: whatever "
                                      "it reaches is answer bias), evaluate all three on held-out scenes. Flags after "
                                      "--workdir: --config demo[:arg] (or a config file), --config.KEY=VALUE.")
    demo.add_argument("--workdir", default="workdir_demo")
    demo.set_defaults(func=_demo, takes_config=True)

    probe = sub.add_parser("probe", help="can the camera's motion be read from the video? (linear probes, no LM)")
    probe.add_argument("data", help="records from fourd-jax synth (train/, val/ and test/ are used)")
    probe.add_argument("--preset", default="tiny", help="the model preset whose vision tower is probed")
    probe.add_argument("--steps", type=whole_number(1), default=1000, help="training steps of the trained-tower reader")
    probe.add_argument("--seed", type=int, default=0)
    probe.add_argument("--out", default="", help="write the results as JSON here")
    probe.set_defaults(func=_probe)

    study = sub.add_parser(
        "study", help="the ablations (text SFT, DIFT, no latent loss, text-only vs full-token 4DRL, blind)",
        description="Every arm on the same data, model and budget (the supervised arms from one reading warm-up); "
                    "writes W/study.json, study.csv and PNG plots. "
                    "Arms: text_sft, dift, dift_no_latent, rl_text, rl_full, blind (the same training with no "
                    "video: whatever it reaches is answer bias). Flags after --workdir: --config.KEY=VALUE.")
    study.add_argument("--preset", choices=["cpu", "accelerator"], default="cpu",
                       help="cpu: <= 90 min on 2 cores for one seed; accelerator: sized for one GPU or TPU host")
    study.add_argument("--workdir", required=True)
    study.add_argument("--seeds", type=whole_number(1), default=1, help="seeds (data and initialisation) per arm")
    study.add_argument("--arms", default="", help="comma-separated subset of the arms (default: all)")
    study.set_defaults(func=_study, takes_config=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, rest = parser.parse_known_args(argv)
        if rest and not getattr(args, "takes_config", False):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
    except UsageError as e:
        print(e, file=sys.stderr)
        return 2
    args.config_args = rest
    try:
        args.func(args)
    except InputError as e:  # bad input is reported as its one sentence, without a traceback
        print(f"fourd-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
