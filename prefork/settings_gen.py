"""Write what the settings table (:mod:`prefork.settings`) generates: the typed fields and the options reference.

``python -m prefork.settings_gen`` writes ``prefork/generated_settings.py``
(the ``Config`` fields and the API's ``ServerOptions``, checked-in source so
that ``mypy --strict`` sees every attribute) and ``docs/options.md``;
``--check`` only says whether they are up to date (exit status 1 when not).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefork.settings import COMMAND_OPTIONS, ENV_PREFIX, GROUPS, SETTINGS, Setting

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "prefork" / "generated_settings.py"
DOCS = ROOT / "docs" / "options.md"
API_ARGUMENTS = ("handler", "bind")  # PreforkServer takes these as its arguments, not as keywords
_HEADER = '''"""The settings' typed forms, generated from the table in prefork/settings.py: do not edit.

Run ``python -m prefork.settings_gen`` after changing the table; a test fails
while this file differs from what the table generates.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Literal, TypedDict

from prefork.settings import default_workers

PathArg = str | os.PathLike[str]


@dataclasses.dataclass(frozen=True)
class SettingFields:
    """Every setting's value; prefork.config.Config adds what is not a setting and the methods."""

'''
_OPTIONS = '''

class ServerOptions(TypedDict, total=False):
    """The keyword arguments: the ``prefork`` command's long options, ``-`` spelt ``_`` (``prefork --help``)."""

    config: PathArg  # a TOML file, as --config; keyword arguments win over it
'''


def field_type(setting: Setting) -> str:
    """The Config field's annotation."""
    if setting.kind == "list":
        return "tuple[str, ...]"
    if setting.kind in ("str", "id"):
        return "str" if setting.default is not None else "str | None"
    return setting.kind


def keyword_type(setting: Setting) -> str:
    """The API keyword's annotation: what a program may pass."""
    if setting.choices:
        return "Literal[" + ", ".join(repr(choice) for choice in setting.choices) + "]"
    return {"list": "str | Sequence[str]", "id": "str | int",
            "str": "PathArg" if setting.path else "str"}.get(setting.kind, setting.kind)


def render_module() -> str:
    lines = []
    for setting in SETTINGS:
        default = (f"dataclasses.field(default_factory={setting.factory})" if setting.factory
                   else repr(setting.default))
        lines.append(f"    {setting.attr}: {field_type(setting)} = {default}\n")
    options = [f"    {s.name}: {keyword_type(s)}\n" for s in SETTINGS if s.name not in API_ARGUMENTS]
    return _HEADER + "".join(lines) + _OPTIONS + "".join(options)


_KIND_TEXT = {"int": "whole number", "float": "seconds", "str": "text", "bool": "switch",
              "list": "list", "id": "name or number"}
_INTRO = f"""# Options

Generated from the settings table in `prefork/settings.py` by `python -m prefork.settings_gen`: do not edit.

Every setting can be given four ways, and the first that gives it wins:

1. the command line: `prefork --workers 4`;
2. the environment: `{ENV_PREFIX}WORKERS=4` (an empty variable counts as not set);
3. the config file (`--config FILE` or `{ENV_PREFIX}CONFIG=FILE`), a TOML table of the long options:
   `workers = 4` (a key may be spelt with `-` or `_`);
4. the default.

In the environment a list is comma-separated (`{ENV_PREFIX}BIND=127.0.0.1:8000,[::1]:8000`), except
`{ENV_PREFIX}RELAY` and `{ENV_PREFIX}SNI`, whose items contain commas and are separated by spaces; a switch is
`true`, `false`, `1`, `0`, `yes`, `no`, `on` or `off`. A `{ENV_PREFIX}*` variable that names no setting is an
error (with the name it is closest to), as is a value of the wrong type or out of range, named by its variable.

A program serving through the Python API (`prefork.serve`, `prefork.PreforkServer`) takes the same settings
as keyword arguments (`workers=4`), which win over the environment, which wins over the `config=` file. The
handler and the address are the API's arguments, so `{ENV_PREFIX}HANDLER` and `{ENV_PREFIX}BIND` do not apply
there.

`prefork --check-config` lists every setting that is not at its default, with where its value came from.
"""


def _allowed(setting: Setting) -> str:
    if setting.choices:
        return "one of " + ", ".join(f"`{choice}`" for choice in setting.choices)
    check = setting.check
    if check is None:
        return ""
    low = f"more than {check.low:g}" if check.above else f"{check.low:g}"
    span = f"{low} or more" if check.high == float("inf") else f"{low} to {check.high:g}"
    return f"0, or {span}" if check.zero else span


def _entry(setting: Setting) -> list[str]:
    if setting.positional:
        title = f"`{setting.metavar}` (argument)"
    else:
        value = f" {setting.metavar}" if setting.kind != "bool" else ""
        flags = [f"`{flag}{value}`" for flag in (setting.option, setting.short) if flag]
        if setting.negatable:
            flags.append(f"`--no-{setting.key}`")
        title = ", ".join(flags)
    kind = "path" if setting.path else _KIND_TEXT[setting.kind]
    allowed = _allowed(setting)
    lines = [f"### {title}", "", setting.full_help() + ".", "",
             f"- type: {kind}" + (f", {allowed}" if allowed else "")]
    if setting.env:
        lines.append(f"- environment: `{setting.env_var}`")
    if setting.toml:
        lines.append(f"- config file: `{setting.key}`")
    if (setting.toml and setting.name not in API_ARGUMENTS) or setting.name == "config":
        lines.append(f"- Python API: `{setting.name}=`")
    return [*lines, ""]


def render_docs() -> str:
    out = [_INTRO]
    every = (*SETTINGS, *COMMAND_OPTIONS)
    for group, about in GROUPS.items():
        out += [f"## {group}", "", about[0].upper() + about[1:] + ".", ""]
        for setting in (s for s in every if s.group == group):
            out += _entry(setting)
        if group == "general":
            out += ["### `--help`, `-h`", "", "Show the options, in these groups, and exit.", "",
                    "### `--version`", "", "Show the version and exit.", ""]
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prefork.settings_gen", description=__doc__)
    parser.add_argument("--check", action="store_true", help="only say whether the generated files are up to date")
    args = parser.parse_args(argv)
    stale = [path for path, text in ((MODULE, render_module()), (DOCS, render_docs()))
             if not path.exists() or path.read_text(encoding="utf-8") != text]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(ROOT)} is out of date: run python -m prefork.settings_gen", file=sys.stderr)
        return 1 if stale else 0
    MODULE.write_text(render_module(), encoding="utf-8")
    DOCS.write_text(render_docs(), encoding="utf-8")
    for path in stale:
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
