"""`fourd-jax`: one entry point, subcommands. Parsing and dispatch only; the work is elsewhere."""

from __future__ import annotations

import argparse
import sys

from fourd_jax.errors import InputError


def _convert(args: argparse.Namespace) -> None:
    from fourd_jax import checkpoint
    from fourd_jax.convert import hf

    if args.direction == "hf-to-jax":
        model, params = hf.load(args.src, dtype=args.dtype)
        out = checkpoint.save_params(args.dst, model, params)
        print(f"wrote Orbax checkpoint {out} (step 0) from {args.src}")
    else:
        model, params = checkpoint.restore_params(args.src, step=args.step)
        tokenizer = None
        if args.tokenizer:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        out = hf.save(model, params, args.dst, tokenizer=tokenizer, max_shard_size=args.max_shard_size)
        print(f"wrote Hugging Face checkpoint {out} from {args.src}")


def _bench(args: argparse.Namespace) -> None:
    if args.what == "forward":
        from fourd_jax.bench import forward

        forward.run(size=args.size, repeats=args.repeats, record=not args.no_record)


def _demo(args: argparse.Namespace) -> None:
    from fourd_jax import demo

    demo.run(args.workdir, parse_config("fourd-jax demo", args.config_args, "configs/demo.py"))


def parse_config(prog: str, argv: list[str], default: str):
    """An ml_collections config from `--config path[:arg]` and `--config.key=value` overrides."""
    from absl import flags
    from ml_collections import config_flags

    values = flags.FlagValues()
    argv = [prog, *argv]
    try:
        # Overrides are read from argv when the flag is defined, so both steps can refuse input.
        config_flags.DEFINE_config_file("config", default, "config file: path[:arg]", flag_values=values,
                                        sys_argv=argv)
        values(argv)
    except (AttributeError, KeyError) as e:
        raise InputError(f"the config has no field {str(e).strip(chr(34))} (from a --config.KEY override).") from None
    except flags.Error as e:
        raise InputError(str(e)) from None
    except FileNotFoundError:
        raise InputError(f"config file {values['config'].serialize()!r} not found; run from the "
                         "repository root or pass --config PATH.") from None
    return values.config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fourd-jax",
        description="JAX/Flax 4DThinker: Qwen2.5-VL that thinks with 4D imagery.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    convert = sub.add_parser("convert", help="convert checkpoints between Hugging Face and Orbax")
    convert.add_argument("direction", choices=["hf-to-jax", "jax-to-hf"])
    convert.add_argument("src", help="HF directory (hf-to-jax) or Orbax checkpoint directory (jax-to-hf)")
    convert.add_argument("dst", help="output directory")
    convert.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                         help="parameter dtype when reading HF weights")
    convert.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    convert.add_argument("--tokenizer", default=None, help="tokenizer directory to copy into the HF output")
    convert.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (e.g. 5GB)")
    convert.set_defaults(func=_convert)

    bench = sub.add_parser("bench", help="benchmarks against PyTorch, recorded in docs/PERFORMANCE.md")
    bench.add_argument("what", choices=["forward"])
    bench.add_argument("--size", default="small", choices=["small", "tiny"])
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--no-record", action="store_true", help="print only, do not write docs/")
    bench.set_defaults(func=_bench)

    demo = sub.add_parser("demo", help="the end-to-end job on a tiny model, on CPU",
                          description="Flags after --workdir: --config configs/demo.py[:arg], --config.KEY=VALUE.")
    demo.add_argument("--workdir", default="workdir_demo")
    demo.set_defaults(func=_demo, takes_config=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if rest and not getattr(args, "takes_config", False):
        build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
    args.config_args = rest
    try:
        args.func(args)
    except InputError as e:  # bad input is reported as its one sentence, without a traceback
        print(f"fourd-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
