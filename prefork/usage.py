"""The command lines' common ground: argparse with one-line errors that suggest what was meant.

``prefork`` and ``preforkctl`` both build on :class:`Parser`. argparse alone
reads ``prefork --wokers 2 app:H`` as the handler ``2`` and two stray words;
here every ``--option`` is checked against the options there are before
anything is parsed, so a misspelt one is named (with the option it is closest
to) and cannot change what the words after it mean.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator, Sequence
from typing import NoReturn

from prefork.config import did_you_mean, quote

_UNRECOGNIZED = "unrecognized arguments: "
_LONG_QUOTE = re.compile(r"'([^']{101,})'")
_INVALID_CHOICE = re.compile(r"invalid choice: '(?P<given>.*)' \(choose from (?P<choices>.*)\)$")


def long_options(parser: argparse.ArgumentParser) -> Iterator[str]:
    """Every ``--option`` of ``parser`` and of its subcommands' parsers."""
    for action in parser._actions:  # argparse keeps no public list of its options
        yield from (o for o in action.option_strings if o.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from long_options(sub)


def misspelt_option(parser: argparse.ArgumentParser, argv: Sequence[str]) -> str | None:
    """The complaint about the first ``--option`` in ``argv`` that no option of ``parser`` starts with.

    A prefix of an option (``--work``) is left to argparse, which takes a unique
    one and refuses an ambiguous one; words after ``--`` are not options.
    """
    known = sorted(set(long_options(parser)))
    for arg in argv:
        if arg == "--":
            return None
        if not arg.startswith("--"):
            continue
        name = arg.split("=", 1)[0]
        if not any(option.startswith(name) for option in known):
            return f"unknown option {quote(name)}{did_you_mean(name, known)}"
    return None


class Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line (no usage dump) raised as ``usage_error``, never an exit."""

    usage_error: type[Exception] = ValueError  # each command line's own UsageError

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        if args is not None:
            complaint = misspelt_option(self, args)
            if complaint is not None:
                self.error(complaint)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        choice = _INVALID_CHOICE.search(message)
        if choice is not None:
            choices = re.findall(r"'([^']*)'", choice["choices"])
            message = message[:choice.start()] + (f"invalid choice: {quote(choice['given'])} "
                                                  f"(choose from {', '.join(choices)})"
                                                  f"{did_you_mean(choice['given'], choices)}")
        if message.startswith(_UNRECOGNIZED):  # argparse lists them as they are
            message = _UNRECOGNIZED + " ".join(quote(arg) for arg in message[len(_UNRECOGNIZED):].split(" "))
        message = _LONG_QUOTE.sub(lambda m: quote(m[1]), message)  # argparse quotes whole values
        raise self.usage_error(f"{message} (see {self.prog.split()[0]} --help)")
