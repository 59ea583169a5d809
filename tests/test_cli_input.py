"""Bad arguments and configs through the installed `fourd-jax` script: each is refused in one line on
stderr, exits 2, and leaves nothing behind; the packaged configs are found from any directory."""

import subprocess
from pathlib import Path

import pytest
from run_configs import run_script


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run_script(args, cwd)


CASES = [
    # Numbers mean what they say: each refused before anything is built or written.
    (["dift", "--workdir", "w", "--steps", "0"],
     "fourd-jax dift: error: argument --steps: must be a whole number >= 1, not 0"),
    (["dift", "--workdir", "w", "--steps", "-5"],
     "fourd-jax dift: error: argument --steps: must be a whole number >= 1, not -5"),
    (["rl", "--workdir", "w", "--steps", "two"],
     "fourd-jax rl: error: argument --steps: must be a whole number >= 1, not 'two'"),
    (["dift", "--workdir", "w", "--config.optim.lr=-1"],
     "fourd-jax dift: error: optim.lr must be a number >= 0, not -1.0."),
    (["dift", "--workdir", "w", "--config.data.batch_size=0"],
     "fourd-jax dift: error: data.batch_size must be a whole number >= 1, not 0."),
    (["eval", "--checkpoint", "c", "--data", "d", "--out", "o", "--max-samples", "-1"],
     "fourd-jax eval: error: argument --max-samples: must be a whole number >= 0, not -1"),
    (["eval", "--checkpoint", "c", "--data", "d", "--out", "o", "--batch-size", "0"],
     "fourd-jax eval: error: argument --batch-size: must be a whole number >= 1, not 0"),
    (["synth", "--out", "s", "--num-scenes", "0"],
     "fourd-jax synth: error: argument --num-scenes: must be a whole number >= 1, not 0"),
    (["synth", "--out", "s", "--num-scenes", "2", "--fps", "0"],
     "fourd-jax synth: error: argument --fps: must be a number > 0, not 0.0"),
    # Config keys and presets: a clean sentence, not ml_collections' text or traceback.
    (["dift", "--workdir", "w", "--config.optim.lrr=1"],
     "fourd-jax dift: error: the config has no field 'lrr' (from a --config.KEY override). "
     'Did you mean "lr" instead of "lrr"?'),
    (["dift", "--workdir", "w", "--config", "dift:huge"],
     "fourd-jax dift: error: unknown preset 'huge'; choose tiny or one of qwen25vl_3b, qwen25vl_7b, qwen3vl_2b, "
     "qwen3vl_4b, qwen3vl_8b."),
    (["rl", "--workdir", "w", "--config=rl:tiny,v9"], "fourd-jax rl: error: unknown mesh preset 'v9'; choose from "),
    (["dift", "--workdir", "w", "--config", "configs/dift.py:tiny"],
     "fourd-jax dift: error: config 'configs/dift.py' is neither a config file nor one of the packaged configs "
     "['demo', 'dift', 'rl', 'sft', 'study']."),
    (["study", "--workdir", "w", "--config.nope=1"],
     "fourd-jax study: error: the config has no field 'nope' (from a --config.KEY override)."),
]


@pytest.mark.parametrize("args,expected", CASES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in CASES])
def test_bad_arguments_are_one_line_and_leave_nothing(args, expected, tmp_path):
    result = run_cli(args, tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(expected), lines[0]
    assert list(tmp_path.iterdir()) == []


def test_a_run_without_data_names_the_flag_and_makes_no_workdir(tmp_path):
    result = run_cli(["dift", "--workdir", "w", "--config", "dift:tiny"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == ("fourd-jax dift: error: no training data: pass --data DIR or "
                                     "--config.data.path=DIR (records from fourd-jax synth or fourd-jax data import).")
    assert list(tmp_path.iterdir()) == []


def test_a_config_file_of_ones_own_still_works(tmp_path):
    (tmp_path / "mine.py").write_text(
        "from fourd_jax.configs import dift\n\n\ndef get_config(arg='tiny'):\n"
        "    c = dift.get_config(arg)\n    c.data.batch_size = 0\n    return c\n")
    result = run_cli(["dift", "--workdir", "w", "--config", "mine.py:tiny"], tmp_path)
    assert result.stderr.strip() == "fourd-jax dift: error: data.batch_size must be a whole number >= 1, not 0."


def test_the_library_refuses_the_same_numbers(tmp_path):
    from run_configs import load_config

    from fourd_jax.errors import InputError
    from fourd_jax.eval.evaluate import EvalConfig
    from fourd_jax.train import dift
    from fourd_jax.train.settings import RunSettings

    for field, value in (("batch_size", 0), ("max_samples", -1), ("max_new_tokens", 0), ("batch_size", 1.5)):
        with pytest.raises(InputError, match=f"^eval {field} must be a whole number"):
            EvalConfig(**{field: value})
    settings = RunSettings.of(load_config("dift"))
    for steps in (0, -5):
        with pytest.raises(InputError, match=f"^steps must be a whole number >= 1, not {steps}.$"):
            dift.train(settings, tmp_path / "w", data=str(tmp_path), steps=steps)
    assert not (tmp_path / "w").exists()


def test_eval_refuses_to_score_another_split_without_a_word(tmp_path):
    (tmp_path / "d" / "train").mkdir(parents=True)
    (tmp_path / "d" / "val").mkdir()
    result = run_cli(["eval", "--checkpoint", "c", "--data", "d", "--out", "o"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == ("fourd-jax eval: error: --data d has no test/ split (it has train/, val/); "
                                     "pass --split val to score that one.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    from fourd_jax.eval.evaluate import split_directory

    assert split_directory(tmp_path / "d", "val") == tmp_path / "d" / "val"
    (tmp_path / "plain").mkdir()
    assert split_directory(tmp_path / "plain") == tmp_path / "plain"  # records without splits are scored as they are


def parser_commands(parser, path=()):
    """{("data", "import"): {"--format", ...}, ...}: every runnable command and its flags."""
    import argparse

    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        flags = {o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
        return {path: flags | ({"--config"} if parser.get_default("config_file") else set())}
    out = {}
    for name, child in subs[0].choices.items():
        out.update(parser_commands(child, (*path, name)))
    return out


def readme_commands():
    """The same, read from the README's command list."""
    import re

    text = (Path(__file__).parents[1] / "README.md").read_text()
    block = text.split("## Command line", 1)[1].split("```", 2)[1]
    out = {}
    for line in block.splitlines():
        if not line.startswith("fourd-jax "):
            continue
        words = line.split("#")[0].split()[1:]
        path = tuple(w for w in words[:2] if re.fullmatch(r"[a-z][a-z0-9-]*", w))
        flags = set(re.findall(r"(--[a-z][a-z-]*)(?![a-zA-Z.-])", line.split("#")[0]))
        out[path] = flags
    return out


def test_the_readme_command_list_matches_the_parser():
    from fourd_jax.cli_args import build_parser

    parsed, documented = parser_commands(build_parser()), readme_commands()
    assert sorted(documented) == sorted(parsed)
    for command, flags in parsed.items():
        assert documented[command] == flags, command


def test_every_flag_has_help():
    import argparse

    from fourd_jax.cli_args import build_parser

    def walk(parser, path=()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    yield from walk(child, (*path, name))
            elif not isinstance(action, argparse._HelpAction):
                yield path, action

    missing = [f"{' '.join(p)} {a.dest}" for p, a in walk(build_parser()) if not a.help]
    assert not missing, missing


def test_an_unexpected_failure_is_one_line_unless_the_traceback_is_asked_for(monkeypatch, capsys):
    from fourd_jax import cli
    from fourd_jax.errors import DEBUG_ENV

    def broken(args):
        raise RuntimeError("the disk is full\nsecond line of detail")

    monkeypatch.setitem(cli.HANDLERS, "plot", broken)
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    assert cli.main(["plot", "w"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"fourd-jax plot: error: RuntimeError: the disk is full (set {DEBUG_ENV}=1 for the traceback)"]
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(RuntimeError, match="the disk is full"):
        cli.main(["plot", "w"])
