"""docs/containers.md: the Containerfile and the Kubernetes Deployment agree with the daemon they run.

No image is built here. What can be checked without one is: the options the
two files give (the entry point's arguments and the ``PREFORK_*`` variables)
are real options with valid values; the probes ask for paths ``--metrics-bind``
serves, on its port; the ``preStop`` hook is a ``preforkctl`` command that
parses; the grace period outlasts the longest stop the daemon can make; and
the image's command, run with the image's environment as PID 1 of a new PID
namespace (what a container runtime does), serves, answers both probes,
drains on the ``preStop`` hook, reaps an orphan and stops with status 0 on
``SIGTERM``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from test_docs import check_command, check_preforkctl, commands_in, fenced_blocks
from test_haproxy import free_port
from test_health import http

from conftest import ROOT, Daemon, child_env, exchange, wait_for
from prefork import cli, httpmetrics
from prefork.config import build_config
from prefork.master.pool import DRAIN_MARGIN, GROUP_GRACE

HERE = ROOT / "docs" / "containers"
CONTAINERFILE = HERE / "Containerfile"
DEPLOYMENT = HERE / "deployment.yaml"


def instructions(text: str) -> list[tuple[str, str]]:
    """The Containerfile's (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    found: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        found.append((word.upper(), rest.strip()))
        pending = ""
    return found


def image() -> tuple[dict[str, str], list[str]]:
    """(the image's ENV, its ENTRYPOINT followed by its CMD)."""
    env: dict[str, str] = {}
    argv: dict[str, list[str]] = {}
    for word, rest in instructions(CONTAINERFILE.read_text()):
        if word == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                env[key] = value
        elif word in ("ENTRYPOINT", "CMD"):
            argv[word] = json.loads(rest)  # exec form: no shell between the runtime and prefork
    return env, argv["ENTRYPOINT"] + argv["CMD"]


def container() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load(DEPLOYMENT.read_text())["spec"]["template"]["spec"]
    return spec


def deployment_env() -> dict[str, str]:
    return {e["name"]: e["value"] for e in container()["containers"][0]["env"]}


def settings(env: dict[str, str]) -> dict[str, str]:
    """``PREFORK_WORKERS=2`` -> ``{"--workers": "2"}``: the option each variable stands for."""
    return {"--" + k.removeprefix("PREFORK_").lower().replace("_", "-"): v
            for k, v in env.items() if k.startswith("PREFORK_")}


def option_value(option: str) -> str:
    """The value the Deployment gives ``option``, else the image's."""
    value = {**settings(image()[0]), **settings(deployment_env())}[option]
    return value


def test_the_page_shows_both_files_as_they_are() -> None:
    blocks = {b.info: b.text for b in fenced_blocks(ROOT / "docs" / "containers.md")}
    assert blocks["dockerfile"] == CONTAINERFILE.read_text()
    assert blocks["yaml"] == DEPLOYMENT.read_text()


@pytest.mark.parametrize("source", ["Containerfile", "deployment.yaml"])
def test_every_prefork_variable_is_a_real_option_with_a_valid_value(source: str) -> None:
    env = image()[0] if source == "Containerfile" else deployment_env()
    options = settings(env)
    assert options, f"{source} sets no PREFORK_* variable"
    for option, value in options.items():
        overrides, _, _ = cli.parse_args([option, value])  # an unknown option or a bad value raises
        build_config(overrides)


def test_the_entry_point_and_the_deployment_args_parse_as_prefork() -> None:
    _, argv = image()
    assert argv[0] == "prefork"
    check_command(argv)
    args = container()["containers"][0]["args"]
    check_command([argv[0], *args])  # args replace the image's CMD, after its ENTRYPOINT


def test_the_probes_ask_the_metrics_port_for_paths_it_serves() -> None:
    spec = container()["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in spec["ports"]}
    metrics_port = int(option_value("--metrics-bind").rsplit(":", 1)[1])
    bind_port = int(option_value("--bind").rsplit(":", 1)[1])
    assert bind_port in ports.values()
    served = httpmetrics.PATHS.decode()
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = spec[probe]["httpGet"]
        assert get["path"] == path and path in served
        assert ports[get["port"]] == metrics_port


def pre_stop() -> list[str]:
    command: list[str] = container()["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    return command


def test_the_pre_stop_hook_is_a_drain_that_parses() -> None:
    shell, flag, script = pre_stop()
    assert (shell, flag) == ("sh", "-c")
    ctl = [words for words in commands_in(script) if words[0] == "preforkctl"]
    assert [w for words in ctl for w in words if w == "drain"] == ["drain"]
    for words in ctl:
        check_preforkctl(words)


def pre_stop_bound() -> float:
    """The longest the hook can take: each ``preforkctl``'s --timeout, plus each ``sleep``."""
    total = 0.0
    for part in pre_stop()[2].split(";"):
        words = shlex.split(part.replace("&&", ";"))
        if words[0] == "preforkctl":
            assert "--timeout" in words, "an unbounded preforkctl in preStop"
            total += float(words[words.index("--timeout") + 1])
        elif words[0] == "sleep":
            total += float(words[1])
    return total


def test_the_grace_period_outlasts_the_longest_stop() -> None:
    """preStop, then SIGTERM: the queue served (up to --graceful-timeout), then the open connections
    finished (up to --graceful-timeout again), a busy worker killed DRAIN_MARGIN later, what a handler left
    behind GROUP_GRACE after that. All of it before the kubelet's SIGKILL."""
    graceful = float(option_value("--graceful-timeout"))
    longest = pre_stop_bound() + 2 * graceful + DRAIN_MARGIN + GROUP_GRACE
    grace = container()["terminationGracePeriodSeconds"]
    assert longest < grace, f"a stop may take {longest:g}s, over terminationGracePeriodSeconds {grace}"
    assert longest == 51.5  # the figure docs/containers.md works out
    workers = int(option_value("--workers"))
    assert workers == int(container()["containers"][0]["resources"]["limits"]["cpu"])  # one per CPU


@contextlib.contextmanager
def as_pid_1(tmp_path: Path, args: list[str] | None = None) -> Iterator[tuple[Daemon, dict[str, str], int]]:
    """The image's command under ``unshare --pid --fork --mount-proc``, with the image's ENV and the
    Deployment's env on top; its addresses moved to loopback (the listener by the command line, which wins
    over PREFORK_BIND; the metrics port by PREFORK_METRICS_BIND). Yields (daemon, env, metrics port)."""
    image_env, argv = image()
    metrics = free_port()
    env = child_env(**{**{k: v for k, v in image_env.items() if k not in ("PATH", "PREFORK_BIND")},
                       **deployment_env(), "PREFORK_METRICS_BIND": f"127.0.0.1:{metrics}",
                       "XDG_RUNTIME_DIR": str(tmp_path)})  # where prefork puts its control socket, preforkctl looks
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # the image's PATH: prefork's bin
    command = [shutil.which(argv[0], path=env["PATH"]) or argv[0], *(argv[1:] if args is None else args),
               "--bind", "127.0.0.1:0"]  # a port of the kernel's choosing, on loopback (the command line wins)
    log = tmp_path / "pid1.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", *command], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=tmp_path)
    d = Daemon(proc=proc, control=str(tmp_path / "prefork.sock"), log_path=log, args=command)
    try:
        st = d.wait_serving(workers=int(env["PREFORK_WORKERS"]))
        assert st["pid"] == 1, st["pid"]  # the namespace's init, as in a container
        d.port = int(st["listeners"][0].rsplit(":", 1)[1])
        yield d, env, metrics
    except BaseException:
        print(d.log())
        raise
    finally:
        d.stop()


def master_pid(d: Daemon) -> int:
    """PID 1 of the namespace, as this side sees it: unshare's only child."""
    children = psutil.Process(d.pid).children()
    assert len(children) == 1, children
    return children[0].pid


def test_the_image_command_as_pid_1_serves_drains_and_stops_on_sigterm(tmp_path: Path) -> None:
    with as_pid_1(tmp_path) as (d, env, metrics):
        assert exchange(d.address(), b"Hello\n") == b"Hello\n"
        spec = container()["containers"][0]
        ready, live = spec["readinessProbe"]["httpGet"]["path"], spec["livenessProbe"]["httpGet"]["path"]
        assert http(metrics, ready)[0] == 200 and http(metrics, live)[0] == 200
        hook = subprocess.run(pre_stop(), env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=pre_stop_bound() + 10)
        assert hook.returncode == 0, hook.stdout + hook.stderr
        assert http(metrics, ready)[:1] == (503,) and "draining" in http(metrics, ready)[2]
        assert http(metrics, live)[0] == 200  # draining is not dying
        assert exchange(d.address(), b"still served\n") == b"still served\n"
        began = time.monotonic()
        os.kill(master_pid(d), signal.SIGTERM)  # what the kubelet sends once preStop returns
        assert d.wait_exit(float(env["PREFORK_GRACEFUL_TIMEOUT"])) == 0  # unshare passes PID 1's status on
        assert time.monotonic() - began < float(env["PREFORK_GRACEFUL_TIMEOUT"])


def test_as_pid_1_the_master_reaps_what_a_handler_orphans(tmp_path: Path) -> None:
    with as_pid_1(tmp_path, ["hardening_handlers:LeavesAnOrphan"]) as (d, _, _):
        master = psutil.Process(master_pid(d))

        def orphans() -> list[psutil.Process]:
            found = []
            for p in master.children():
                with contextlib.suppress(psutil.NoSuchProcess):  # one that was reaped meanwhile
                    if p.name() == "sleep":
                        found.append(p)
            return found

        assert exchange(d.address(), b"orphan\n") == b"orphan\n"
        wait_for(orphans, 10, "the orphaned sleep to be re-parented to PID 1, the master")
        wait_for(lambda: not orphans(), 20, "the orphan to exit and be reaped (not left a zombie)")
        assert [p for p in master.children() if p.status() == psutil.STATUS_ZOMBIE] == []
        assert exchange(d.address(), b"Hello\n") == b"Hello\n"
