"""Every script's --help shows the default of each option that has one, so a newcomer
learns what a flag does without reading the code."""
import argparse
import dataclasses

import bench
import config
import hellaswag
from conftest import run


def options(parser, name):
    """Every option of a parser and of its subcommands: (command, action)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from options(sub, f"{name} {sub_name}")
        elif action.option_strings and action.nargs != 0 and action.dest != "help":
            yield name, action


def test_every_help_shows_the_defaults():
    # an option that takes a value and has a default says which, as train_gpt2.py's say
    # it for the gpt2 preset; fineweb.py builds its parser in main(), so read its --help
    parsers = {"train_gpt2.py": config.build_parser(), "hellaswag.py": hellaswag.build_parser(),
               "bench.py": bench.build_parser()}
    fields = {f.name for f in dataclasses.fields(config.TrainConfig)}
    silent = [f"{command} {action.option_strings[0]}"
              for name, parser in parsers.items() for command, action in options(parser, name)
              if (action.dest in fields or action.default not in (None, argparse.SUPPRESS))
              and "default" not in action.help and "preset:" not in action.help]
    assert silent == []
    out = run(["fineweb.py", "--help"]).stdout
    assert "(default: sample-10BT)" in out and "(default: 100000000)" in out


def test_every_numeric_flag_shows_its_range():
    parsers = {"train_gpt2.py": config.build_parser(), "hellaswag.py": hellaswag.build_parser()}
    for parser in parsers.values():
        for action in parser._actions:
            if action.type in (int, float):
                assert action.dest in parser.ranges, action.dest
                assert action.help.endswith(f"[{parser.ranges[action.dest]}]")
    help = config.build_parser().format_help()
    assert "[0 (no clipping) or above 0]" in " ".join(help.split())  # --grad-clip
