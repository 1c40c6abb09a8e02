"""The shipped units pass systemd's own checks, pointed at the installed commands."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
BIN = Path(sys.executable).parent


def installed_copy(tmp_path: Path, name: str, as_name: str | None = None) -> Path:
    text = (ROOT / "systemd" / name).read_text()
    assert "/usr/local/bin/prefork" in text or name.endswith(".socket")
    text = text.replace("/usr/local/bin/", f"{BIN}/")
    dest = tmp_path / (as_name or name)
    dest.write_text(text)
    return dest


@pytest.mark.parametrize("units", [("prefork.service", "prefork.socket"), ("prefork@.service",)])
def test_units_verify_clean(tmp_path: Path, units: tuple[str, ...]) -> None:
    assert (BIN / "prefork").exists() and (BIN / "preforkctl").exists()
    paths = [installed_copy(tmp_path, u, u.replace("@.", "@echo.")) for u in units]
    result = subprocess.run(["systemd-analyze", "verify", *map(str, paths)], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # unknown keys and bad values are only warnings: none may mention our units
    ours = [line for line in (result.stdout + result.stderr).splitlines() if "prefork" in line]
    assert not ours, "\n".join(ours)


def test_verify_fails_when_the_command_is_missing(tmp_path: Path) -> None:
    """The check above can fail: a unit pointing at a missing binary is refused."""
    unit = tmp_path / "prefork.service"
    unit.write_text((ROOT / "systemd" / "prefork.service").read_text().replace("/usr/local/bin/", "/nonexistent/"))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0


def test_hardening_exposure_is_low(tmp_path: Path) -> None:
    unit = installed_copy(tmp_path, "prefork.service")
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)], capture_output=True,
                            text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, match.group(0)


def test_example_config_is_valid() -> None:
    from prefork.config import build_config

    config = build_config({}, str(ROOT / "systemd" / "prefork.toml"))
    assert config.workers == 4 and config.worker_class == "thread"
