"""The examples in README.md and docs/ are checked against the code they describe.

Every ``prefork`` and ``preforkctl`` command line (in a shell block or an
inline code span) parses with the command's own parser, and a ``prefork``
line without ``--config`` is validated as a start would; every TOML block
loads and validates with the configuration loader; every Python block
compiles, and each handler module a page shows (a block opening with
``# name.py``) is served by a real daemon and answers; every relative link
between the pages reaches a file and, with ``#anchor``, one of its headings.
Each checker is also shown a broken example, so a check that passes cannot
be one that passes everything.
"""

from __future__ import annotations

import doctest
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT, child_env, exchange, start_daemon
from prefork import cli
from prefork.config import DEFAULT_BIND, build_config
from prefork.ctl import parser as ctl_parser
from prefork.ctl.commands import COMMANDS

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINKED = [*PAGES, ROOT / "BENCHMARKS.md"]
SHELL = ("", "sh", "shell", "console", "bash")
COMMAND_NAMES = {"prefork", "preforkctl"}
# what the pages write for "a value of your own", and a value that stands for it
PLACEHOLDERS = {"N": "3", "NAME": "app1", "SECS": "5", "MASTER": "1"}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence
    info: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


FENCE = re.compile(r"^[ \t]*(`{3,})(.*)$")


def split_page(text: str) -> tuple[list[tuple[int, str, str]], str]:
    """(the fenced blocks as (line of the opening fence, info string, body), the prose left around them)."""
    lines = text.split("\n")
    blocks, kept, i = [], [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            kept.append(lines[i])
            i += 1
            continue
        fence, body, start = opening.group(1), [], i
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        blocks.append((start + 1, opening.group(2).strip(), "\n".join(body) + "\n"))
        i += 1
    return blocks, "\n".join(kept)


def fenced_blocks(page: Path, text: str | None = None) -> list[Block]:
    """The page's fenced code blocks, in order."""
    blocks, _ = split_page(page.read_text() if text is None else text)
    return [Block(page, line, info, body) for line, info, body in blocks]


def prose(text: str) -> str:
    """The page without its fenced blocks."""
    return split_page(text)[1]


def command_lines(block: Block) -> Iterator[list[str]]:
    """Each ``prefork``/``preforkctl`` command in a shell block, as words (comments, prompts and output dropped)."""
    lines = block.text.splitlines()
    if any(line.startswith("$ ") for line in lines):
        lines = [line[2:] for line in lines if line.startswith("$ ")]  # the rest is output
    for line in lines:
        yield from commands_in(line)


COMMAND_LINE = re.compile(r"(\S*/)?(prefork|preforkctl|scripts/serve)(\s|$)")


def commands_in(line: str) -> Iterator[list[str]]:
    """The commands on a line that starts with one of ours (other lines are other tools, or not shell at all)."""
    if not COMMAND_LINE.match(line.strip()):
        return
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)  # "drain;" is two words, as for sh
    lexer.whitespace_split = True
    words = list(lexer)
    segment: list[str] = []
    for word in [*words, ";"]:
        if word in ("&&", "||", ";", "|"):
            if segment and Path(segment[0]).name in COMMAND_NAMES:
                yield segment
            elif segment[:1] == ["scripts/serve"]:
                yield ["prefork", *segment[1:]]  # its arguments are prefork's
            segment = []
        else:
            segment.append(word)


def inline_commands(page: Path) -> Iterator[list[str]]:
    """``preforkctl ...`` and ``prefork ...`` in the prose's code spans, placeholders filled in."""
    for span in re.findall(r"`([^`]+)`", prose(page.read_text())):
        span = " ".join(span.split()).replace("\\|", "|")
        if not re.match(r"(prefork|preforkctl) ", span) or "[" in span or "..." in span:
            continue
        for words in commands_in(span):
            yield [PLACEHOLDERS.get(w, w) for w in words]


def check_prefork(words: list[str]) -> None:
    """Parse as ``prefork`` does; without a config file, check the settings as a start would."""
    argv = [PLACEHOLDERS.get(w, w) for w in words[1:]]
    try:
        overrides, config_file, _ = cli.parse_args(argv)
    except SystemExit as exc:  # --help, --version
        assert exc.code == 0, f"{shlex.join(words)}: exit {exc.code}"
        return
    if config_file is None:
        build_config(overrides)


def check_preforkctl(words: list[str]) -> None:
    """Parse as ``preforkctl`` does, up to the request it would send."""
    try:
        args = ctl_parser.build_parser().parse_args([PLACEHOLDERS.get(w, w) for w in words[1:]])
    except SystemExit as exc:  # --help, --version
        assert exc.code == 0, f"{shlex.join(words)}: exit {exc.code}"
        return
    ctl_parser.output_format(args)
    COMMANDS[args.command].request(args)


def check_command(words: list[str]) -> None:
    (check_prefork if Path(words[0]).name == "prefork" else check_preforkctl)(words)


def all_commands() -> list[tuple[str, list[str]]]:
    found = [(b.where, words) for page in PAGES for b in fenced_blocks(page) if b.info in SHELL
             for words in command_lines(b)]
    found += [(f"{page.relative_to(ROOT)} (inline)", words) for page in PAGES for words in inline_commands(page)]
    return found


def test_the_pages_hold_examples_of_each_kind() -> None:
    """The extraction finds what is there (an empty list would pass every test below)."""
    commands = all_commands()
    assert len([w for _, w in commands if Path(w[0]).name == "prefork"]) >= 10
    assert len([w for _, w in commands if w[0] == "preforkctl"]) >= 30
    infos = [b.info for page in PAGES for b in fenced_blocks(page)]
    assert infos.count("toml") >= 4 and infos.count("python") >= 8


@pytest.mark.parametrize(("where", "words"), all_commands(), ids=lambda v: v if isinstance(v, str) else None)
def test_every_command_line_parses(where: str, words: list[str]) -> None:
    check_command(words)


def test_a_broken_command_line_is_caught() -> None:
    broken = [["prefork", "--wokers", "2"], ["prefork", "--workers", "0"], ["preforkctl", "scale", "+x"],
              ["preforkctl", "drian"], ["prefork", "--relay-send-proxy"], ["preforkctl", "top", "--json"]]
    for words in broken:
        with pytest.raises((ValueError, cli.UsageError, ctl_parser.UsageError)):
            check_command(words)


def check_toml(text: str, tmp_path: Path) -> None:
    path = tmp_path / "example.toml"
    path.write_text(text)
    build_config({}, str(path))


def toml_blocks() -> list[Block]:
    return [b for page in PAGES for b in fenced_blocks(page) if b.info == "toml"]


@pytest.mark.parametrize("block", toml_blocks(), ids=lambda b: b.where)
def test_every_toml_block_loads_and_validates(block: Block, tmp_path: Path) -> None:
    check_toml(block.text, tmp_path)


def test_a_broken_toml_block_is_caught(tmp_path: Path) -> None:
    for text in ('wokers = 4\n', 'workers = "four"\n', 'bind = ["127.0.0.1:99999"]\n', 'workers = \n'):
        with pytest.raises(ValueError):
            check_toml(text, tmp_path)


def python_sources(block: Block) -> list[str]:
    """The block as one program, or each statement of an interpreter session (``>>>``)."""
    if ">>>" not in block.text:
        return [block.text]
    return [example.source for example in doctest.DocTestParser().get_examples(block.text)]


def python_blocks() -> list[Block]:
    return [b for page in PAGES for b in fenced_blocks(page) if b.info == "python"]


@pytest.mark.parametrize("block", python_blocks(), ids=lambda b: b.where)
def test_every_python_block_compiles(block: Block) -> None:
    for source in python_sources(block):
        compile(source, block.where, "exec")


def test_a_broken_python_block_is_caught() -> None:
    block = Block(ROOT / "README.md", 1, "python", "class H(BaseRequestHandler)\n    pass\n")
    with pytest.raises(SyntaxError):
        test_every_python_block_compiles(block)


@dataclass(frozen=True)
class Served:
    """A handler module a page shows, and the command line that serves it (or the module's class alone)."""

    where: str
    files: dict[str, str]
    argv: list[str]


HANDLER_BASES = ("RequestHandler)", "asyncio.Protocol)")


def served_examples() -> list[Served]:
    """Every ``# name.py`` block, served by the command that follows it on its page, else by its handler class."""
    found: list[Served] = []
    for page in PAGES:
        files: dict[str, str] = {}
        unserved: dict[str, Block] = {}
        for block in fenced_blocks(page):
            header = re.match(r"# (\w+)\.py\b", block.text)
            if block.info == "python" and header:
                files[header.group(1)] = block.text
                unserved[header.group(1)] = block
            if block.info in SHELL:
                for words in command_lines(block):
                    handler = next((w for w in words[1:] if re.fullmatch(r"\w+:\w+", w)), None)
                    if Path(words[0]).name == "prefork" and handler and handler.split(":")[0] in files:
                        unserved.pop(handler.split(":")[0], None)
                        found.append(Served(f"{block.where}: {shlex.join(words)}", dict(files), words[1:]))
        for module, block in unserved.items():
            cls = re.search(r"^class (\w+)\(.*(?:" + "|".join(map(re.escape, HANDLER_BASES)) + ")", block.text, re.M)
            if cls:
                found.append(Served(f"{block.where}: {module}:{cls.group(1)}", {module: block.text},
                                    [f"{module}:{cls.group(1)}"]))
    return found


def loopback(argv: list[str]) -> list[str]:
    """The command's own options, but on a loopback port of the test's choosing and with one worker."""
    out, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word in ("-b", "--bind", "-w", "--workers"):
            skip = True
        else:
            out.append(word)
    return out


def test_the_handler_examples_are_found() -> None:
    handlers = {s.argv[-1] for s in served_examples()}
    assert {"echo:EchoHandler", "handlers:Upper", "handlers:line_echo"} <= handlers, handlers


@pytest.mark.parametrize("example", served_examples(), ids=lambda s: s.where)
def test_the_handler_examples_serve(example: Served, tmp_path: Path) -> None:
    for module, text in example.files.items():
        (tmp_path / f"{module}.py").write_text(text)
    d = start_daemon(tmp_path, *loopback(example.argv), workers=1, env=child_env())
    try:
        upper = example.argv[-1].endswith(":Upper")
        assert exchange(d.address(), b"hello docs\n") == (b"HELLO DOCS\n" if upper else b"hello docs\n")
    finally:
        d.stop()


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in prose(page.read_text()).splitlines():
        heading = re.match(r"#{1,6} (.+)$", line)
        if heading:
            base = slug(heading.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def broken_links(page: Path, text: str | None = None) -> list[str]:
    """Relative links in the page's prose whose file, or heading, is not there."""
    broken = []
    body = re.sub(r"`[^`]*`", "", prose(page.read_text() if text is None else text))
    for target in re.findall(r"\]\(([^)\s]+)\)", body):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:, file:
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    return broken


@pytest.mark.parametrize("page", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_between_the_pages_resolves(page: Path) -> None:
    assert broken_links(page) == []


def test_a_broken_link_is_caught() -> None:
    text = "[a](docs/nowhere.md), [b](docs/tls.md#no-such-heading), [c](#quick-start), [d](docs/tls.md#tls)\n"
    assert broken_links(ROOT / "README.md", text) == [
        "docs/nowhere.md: no such file", "docs/tls.md#no-such-heading: no heading #no-such-heading in docs/tls.md"]


def test_every_page_is_in_the_readme_contents() -> None:
    linked = set(re.findall(r"\]\((docs/[\w-]+\.md)\)", (ROOT / "README.md").read_text()))
    pages = {str(p.relative_to(ROOT)) for p in PAGES[1:]} | {"docs/options.md"}
    assert pages == linked


def test_the_quick_start_is_two_commands_on_a_fresh_machine() -> None:
    block = next(b for b in fenced_blocks(ROOT / "README.md") if "scripts/serve" in b.text)
    commands = [shlex.split(line, comments=True) for line in block.text.splitlines()]
    assert commands == [["scripts/serve"], ["scripts/test"]]
    for script in ("serve", "test"):
        assert (ROOT / "scripts" / script).stat().st_mode & 0o111


def test_the_interpreter_session_talks_to_the_quick_start_port() -> None:
    """The README's session connects where ``scripts/serve`` listens by default."""
    block = next(b for b in fenced_blocks(ROOT / "README.md") if ">>>" in b.text)
    connect = next(s for s in python_sources(block) if ".connect(" in s)
    assert "20000" in connect
    assert DEFAULT_BIND.endswith(":20000")
