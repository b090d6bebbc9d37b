"""The README against the code: the command synopsis against the argument parser, the
layout against the files."""

import argparse
import re
from pathlib import Path

from fanoutd import cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
# Commands whose synopsis lists every option (tail and doctor name some in the text).
LISTED_IN_FULL = ("run", "stats", "keygen", "relay")


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli._parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def synopsis() -> dict[str, str]:
    """{command: its synopsis text} from the "Running it" block, comments dropped."""
    block = README.split("## Running it", 1)[1].split("\n\n", 2)[1]
    commands: dict[str, str] = {}
    current = None
    for line in block.splitlines():
        text = line.split("#", 1)[0].strip()
        match = re.match(r"fanoutd ([\w-]+)(.*)", text)
        if match:
            current = match.group(1)
            commands[current] = match.group(2)
        elif current and text:
            commands[current] += " " + text
    return commands


def test_synopsis_names_every_command():
    assert set(synopsis()) == set(subcommands())


def test_synopsis_lists_every_option():
    found = synopsis()
    for command in LISTED_IN_FULL:
        listed = set(re.findall(r"(?<![\w-])--?[a-z][\w-]*", found[command]))
        missing = [a.option_strings[-1] for a in subcommands()[command]._actions
                   if a.option_strings and "--help" not in a.option_strings
                   and not listed & set(a.option_strings)]
        assert not missing, f"{command}: not in the README's synopsis: {missing}"


def test_synopsis_brackets_what_is_optional():
    """An option outside brackets must be one the command requires."""
    for command, text in synopsis().items():
        outside = text
        while re.search(r"\[[^\[\]]*\]", outside):
            outside = re.sub(r"\[[^\[\]]*\]", " ", outside)
        required = {o for a in subcommands()[command]._actions if a.required
                    for o in a.option_strings}
        for option in re.findall(r"(?<![\w-])--?[a-z][\w-]*", outside):
            assert option in required, f"{command}: {option} is optional: [{option} ...]"


def test_layout_lists_every_file_of_the_package():
    layout = README.split("## Layout", 1)[1]
    listed = set(re.findall(r"^      (\S+\.(?:py|c))\s", layout, re.M))
    files = {p.name for p in (ROOT / "fanoutd").iterdir() if p.suffix in (".py", ".c")}
    assert listed == files, (f"missing: {sorted(files - listed)}, "
                             f"no such file: {sorted(listed - files)}")
    directories = {p.name for p in ROOT.iterdir() if p.is_dir()
                   and not p.name.startswith((".", "_")) and not p.name.endswith("egg-info")
                   and p.name not in ("build", "dist")}
    for name in directories:
        assert re.search(rf"^    .*\b{name}/", layout, re.M), f"{name}/ is not in the layout"
