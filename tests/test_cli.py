"""The command line a new user meets: `python -m dsfleet` is `dsfleet`, `--version` answers, every train flag has
a help line with its default and choices (from the RunSpec field, one place), the usage line names the command as
it was typed, and the flag table in docs/flags.md and the README's flag list are the parser's.

Regenerate docs/flags.md and the README's list after changing a flag: `.venv/bin/python -m tests.test_cli`.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys

import pytest

import dsfleet
from dsfleet.spec import ALIASES, RunSpec, _choices, build_parser, shown_default
from tests.launch import REPO, VENV_BIN, cpu_env

FLAGS_DOC = REPO / "docs" / "flags.md"
README = REPO / "README.md"
BEGIN = "<!-- train flags: generated from the run spec by `python -m tests.test_cli`; do not edit -->"
END = "<!-- end of train flags -->"


def run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=120)


PYTHON_M = [sys.executable, "-m", "dsfleet"]
CONSOLE = [str(VENV_BIN / "dsfleet")]


# ---- python -m dsfleet, --version, usage lines ---------------------------------------------------------------------

def test_version_everywhere():
    want = f"dsfleet {dsfleet.__version__}"
    assert dsfleet.__version__ == importlib.metadata.version("dsfleet")  # pyproject.toml says the same
    for argv in (PYTHON_M + ["--version"], CONSOLE + ["--version"], PYTHON_M + ["train", "--version"],
                 [sys.executable, "-m", "dsfleet.train", "--version"]):
        proc = run(argv)
        assert (proc.returncode, proc.stdout.strip(), proc.stderr) == (0, want, ""), argv


@pytest.mark.parametrize("argv, prog", [
    (PYTHON_M + ["train", "--help"], "python -m dsfleet train"),
    (CONSOLE + ["train", "--help"], "dsfleet train"),
    ([sys.executable, "-m", "dsfleet.train", "--help"], "python -m dsfleet.train"),
    (PYTHON_M + ["plan", "--help"], "python -m dsfleet plan"),
    (PYTHON_M + ["--help"], "python -m dsfleet"),
])
def test_usage_names_the_command_as_typed(argv, prog):
    proc = run(argv)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: {prog} "), proc.stdout[:200]


def test_python_m_dsfleet_is_the_console_script():
    for args in (["plan", "--preset", "t5_3b", "--gpus", "8", "--gpu-mem", "80GiB"],  # a subcommand that works
                 ["plan", "--preset", "t5_3b", "--gpus", "0"],  # bad input: one line, exit 2
                 ["frobnicate"], []):
        by_module, by_script = run(PYTHON_M + args), run(CONSOLE + args)
        assert by_module.returncode == by_script.returncode, args
        same = [p.stdout.replace("python -m dsfleet", "dsfleet") for p in (by_module, by_script)]
        assert same[0] == same[1], args  # but for the name in usage lines
        assert by_module.stderr == by_script.stderr, args
    assert run(PYTHON_M + ["plan", "--preset", "t5_3b", "--gpus", "0"]).returncode == 2


# ---- every flag has a help line with its default and choices --------------------------------------------------------

def flag_actions(parser: argparse.ArgumentParser):
    """(group title, action) for every flag --help shows, in its order."""
    for group in parser._action_groups:
        for action in group._group_actions:
            if action.help != argparse.SUPPRESS:
                yield group.title, action


def test_every_flag_has_help_with_default_and_choices():
    parser = build_parser()
    shown = {a.dest: a for _, a in flag_actions(parser)}
    for name, field in RunSpec.model_fields.items():
        assert field.description, f"RunSpec.{name} has no description"
        action = shown[name]
        text = action.help % {}
        assert text.startswith(field.description), name
        if field.default is not None or "unset:" not in field.description:
            assert f"default: {shown_default(field.default)}" in text, (name, text)
        if _choices(field.annotation):
            assert f"choices: {', '.join(_choices(field.annotation))}" in text, (name, text)
            assert action.metavar == "{" + ",".join(_choices(field.annotation)) + "}", name
    for alias, (target, _) in ALIASES.items():  # each alias is said beside the flag it sets, and under its own name
        assert f"also --{alias} " in shown[target].help, alias
        assert shown[f"_alias_{alias}"].help == f"the same as --{target}", alias
    helpless = [a.option_strings[0] for _, a in flag_actions(parser) if not a.help]
    assert not helpless, helpless


def test_help_defaults_are_what_a_run_gets():
    """The default a help line shows is the value a spec without that flag has (no preset)."""
    from dsfleet.spec import parse_args
    spec = parse_args([])
    for name, field in RunSpec.model_fields.items():
        assert shown_default(getattr(spec, name)) == shown_default(field.default), name


# ---- docs/flags.md and the README's list are the parser's -----------------------------------------------------------

def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _flag_text(action: argparse.Action) -> str:
    value = action.metavar or ""
    if action.nargs == "?":
        value = f"[{value}]"
    elif action.nargs == "+":
        value = f"{value} [{value} ...]"
    return ", ".join(f"{flag} {value}".strip() for flag in action.option_strings)


def flags_markdown() -> str:
    parser = build_parser()
    lines = ["# `dsfleet train` flags", "",
             "The flags of `dsfleet train` (= `python -m dsfleet.train`, `python -m dsfleet train`, the user script "
             "of every launcher): the text of `dsfleet train --help`, generated from the run spec "
             "(`RunSpec` in [src/dsfleet/spec.py](../src/dsfleet/spec.py): each field's description, choices and "
             "default). Regenerate with `.venv/bin/python -m tests.test_cli`; `tests/test_cli.py` checks this file "
             "is current.", "", parser.description]
    title = None
    for group, action in flag_actions(parser):
        if group != title:
            title = group
            lines += ["", f"## {group}", "", "| flag | what it does |", "| --- | --- |"]
        lines.append(f"| `{_cell(_flag_text(action))}` | {_cell(action.help % {})} |")
    return "\n".join(lines) + "\n"


def readme_block() -> str:
    groups: dict[str, list[str]] = {}
    for group, action in flag_actions(build_parser()):
        if group != "options":
            groups.setdefault(group, []).append(action.option_strings[0])
    body = [f"- {group}: {' '.join(f'`{flag}`' for flag in flags)}" for group, flags in groups.items()]
    return "\n".join([BEGIN, *body, END])


def readme_with_block(text: str) -> str:
    head, rest = text.split(BEGIN, 1)
    return head + readme_block() + rest.split(END, 1)[1]


def test_flags_doc_is_current():
    assert FLAGS_DOC.read_text() == flags_markdown(), \
        f"{FLAGS_DOC} is not what the parser says — regenerate it: .venv/bin/python -m tests.test_cli"


def test_readme_flag_list_is_current():
    text = README.read_text()
    assert BEGIN in text and END in text, "README.md lost its generated train-flag list"
    assert text == readme_with_block(text), "README.md's flag list is stale — run .venv/bin/python -m tests.test_cli"
    assert "(docs/flags.md)" in text


def write_docs() -> int:
    FLAGS_DOC.write_text(flags_markdown())
    README.write_text(readme_with_block(README.read_text()))
    print(f"wrote {FLAGS_DOC} and the flag list in {README}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(write_docs())
