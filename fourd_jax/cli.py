"""`fourd-jax`: one entry point, subcommands. Parsing and dispatch only; the work is elsewhere."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from absl import flags
from ml_collections import config_flags

from fourd_jax.cli_args import UsageError, build_parser
from fourd_jax.errors import DEBUG_ENV, InputError, first_line


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
    to_jax = args.direction == "hf-to-jax"  # only jax-to-hf takes a step; only hf-to-jax a dtype
    loaded = load.load_model(source, what="src", step=None if to_jax else args.step,
                             param_dtype=args.dtype if to_jax else None)
    if to_jax:
        out = checkpoint.save_params(args.dst, loaded.model, loaded.params)
        print(f"wrote Orbax checkpoint {out} (step 0) from {args.src}")
    else:
        tokenizer_dir = args.tokenizer or source.tokenizer  # a training workdir's own, unless one is given
        tokenizer = load.load_tokenizer(tokenizer_dir) if tokenizer_dir else None
        lora = _module("model.lora")
        if args.adapter:
            base = args.base_name
            if base is None:  # the unadapted base beside the adapter, so the directory is self-contained
                base = str(hf.save(loaded.model, lora.split(loaded.params)[0], Path(args.dst) / "base",
                                   tokenizer=tokenizer, max_shard_size=args.max_shard_size).resolve())
            out = _module("convert.peft").save_adapter(loaded.model, loaded.params, args.dst, base)
            print(f"wrote PEFT LoRA adapter {out} (base {base}) from {args.src}")
            return
        if args.base_name is not None:
            raise InputError("--base-name goes with --adapter (a merged export has no separate base).")
        # A LoRA run's adapters are folded into the kernels: a plain checkpoint any transformers loads.
        out = hf.save(loaded.model, lora.merge(loaded.params), args.dst, tokenizer=tokenizer,
                      max_shard_size=args.max_shard_size)
        print(f"wrote Hugging Face checkpoint {out} from {args.src}")


def _bench(args: argparse.Namespace) -> None:
    options = {name: getattr(args, name) for name in ("size", "repeats", "rows", "family", "dtype", "examples")
               if hasattr(args, name)}
    _module(f"bench.{args.what}").run(record=not args.no_record, **options)


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
        loaded = _module("load").load_model(args.checkpoint)
        features = _module("data.features").FeatureConfig(latent_size=args.latent_size,
                                                          imagery_max_pixels=args.imagery_max_pixels)
        count = _module("data.targets").write_imagery_targets(args.path, args.out, loaded.model, loaded.params,
                                                              features)
        print(f"wrote {args.out} with imagery targets for {count} records")
    else:
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


def _compile(args: argparse.Namespace) -> None:
    """`fourd-jax compile`: the config's program compiled for a TPU slice, its report, and the two refusals.
    A config that names no mesh gets the topology's mesh preset."""
    aot = _module("aot")
    if args.mfu > 1 or args.max_replicated > 1:
        raise InputError("--mfu and --max-replicated are fractions: each must be in (0, 1].")
    config = parse_config("fourd-jax compile", args.config_args, "dift")
    presets = _module("configs.rl" if "rl" in config else "configs.dift")
    if not _names_a_mesh(args.config_args) and args.topology in presets.MESHES:
        presets.for_slice(config, args.topology)
    settings = _module("train.settings").RunSettings.of(config)
    stage = args.stage or ("rl" if settings.rl is not None else "dift")
    report = aot.compile_stage(settings, stage, args.topology)
    print(report.summary(args.mfu))
    if args.json:
        Path(args.json).write_text(json.dumps(report.as_dict(args.mfu), indent=1) + "\n")
    aot.check(report, args.max_replicated)


def _names_a_mesh(config_args: list[str]) -> bool:
    """Whether a command line sets the mesh: a `--config NAME:PRESET,MESH` or a --config.mesh.shape override."""
    specs = [a.split("=", 1)[1] for a in config_args if a.startswith("--config=")]
    specs += [b for a, b in zip(config_args, config_args[1:], strict=False) if a == "--config"]
    return (any("," in spec.partition(":")[2] for spec in specs)
            or any(a.startswith("--config.mesh.shape") for a in config_args))


def _eval(args: argparse.Namespace) -> None:
    evaluate, report = _module("eval.evaluate"), _module("eval.report")
    config = evaluate.EvalConfig(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                 max_frames=args.max_frames, video_max_pixels=args.max_pixels,
                                 max_samples=args.max_samples, video=not args.blind)
    _module("distributed").initialize()  # on a TPU pod or SLURM job: JAX finds the other processes
    table = evaluate.evaluate(args.checkpoint, args.data, args.out, config, tokenizer_dir=args.tokenizer,
                              split=args.split)
    print(report.compare_table({"accuracy": table}))
    print(f"wrote {args.out}/results.json, results.csv, predictions.jsonl, accuracy.png")


def _plot(args: argparse.Namespace) -> None:
    for path in _module("train.plot").plot_metrics(args.workdir):
        print(f"wrote {path}")


def _demo(args: argparse.Namespace) -> None:
    config = parse_config("fourd-jax demo", args.config_args, "demo")
    _module("distributed").initialize()  # on a TPU pod or SLURM job: JAX finds the other processes
    _module("demo").run(args.workdir, config)


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
    _module("distributed").initialize()  # on a TPU pod or SLURM job: JAX finds the other processes
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


HANDLERS: dict[str, Callable[[argparse.Namespace], None]] = {
    "convert": _convert, "bench": _bench, "synth": _synth, "data": _data, "dift": lambda a: _train(a, "dift"),
    "rl": lambda a: _train(a, "rl"), "compile": _compile, "eval": _eval, "plot": _plot, "demo": _demo,
    "probe": _probe, "study": _study,
}


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
        HANDLERS[args.handler](args)
    except InputError as e:  # bad input is reported as its one sentence, without a traceback
        print(f"fourd-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # any other failure: one line too, unless the traceback is asked for
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"fourd-jax {args.command}: error: {first_line(e)} (set {DEBUG_ENV}=1 for the traceback)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
