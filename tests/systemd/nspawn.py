"""A real systemd, booted with systemd-nspawn on the cached Debian root, driven with nsenter.

The container shares the host's network (no --private-network), so blastd inside reaches the
test's Redis, PostgreSQL and sandbox on 127.0.0.1. Its root is an overlay on the cached one
(--volatile=overlay): what a test writes vanishes at poweroff, and several containers may
boot from the same root at once. --keep-unit and --register=no let nspawn run without a host
systemd or machined (this machine's PID 1 is not systemd).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
ROOT = REPO / ".tmp" / "nspawn-root"
BUILD_ROOT = Path(__file__).with_name("build_root.sh")
BOOT_TIMEOUT_S = 60.0
COMMAND_TIMEOUT_S = 120.0


# These tests fail, never skip, where they cannot run: a machine that cannot show the unit
# working must say so. Leaving them out is the runner's explicit choice.
LEAVE_OUT = "run pytest with -m 'not systemd' to leave the real-systemd tests out"


def cannot_boot_reason() -> str | None:
    """Why this machine cannot build or boot the container; None when it can."""
    if not sys.platform.startswith("linux"):
        return "systemd-nspawn runs on Linux only"
    if os.geteuid() != 0:
        return "debootstrap and systemd-nspawn need root (run the tests as root)"
    return None


async def build_root() -> None:
    """Build the cached root (debootstrap, about 2 min) and its venv, unless they are current."""
    process = await asyncio.create_subprocess_exec(str(BUILD_ROOT), str(ROOT), str(REPO))
    assert await process.wait() == 0, "building the nspawn root failed (see the output above)"


class Container:
    """A booted container; `run` executes a command inside it."""

    def __init__(self, init_pid: int) -> None:
        self.init_pid = init_pid

    async def run(self, *argv: str, check: bool = True) -> str:
        """Run `argv` in the container's namespaces; its stdout (stderr is folded in)."""
        process = await asyncio.create_subprocess_exec(
            "nsenter",
            "-t",
            str(self.init_pid),
            "-a",
            *argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(process.communicate(), COMMAND_TIMEOUT_S)
        text = output.decode()
        if check:
            assert process.returncode == 0, f"{' '.join(argv)} exited {process.returncode}: {text}"
        return text

    async def show(self, unit: str, *properties: str) -> dict[str, str]:
        """`systemctl show` of the given properties, as a dict."""
        args = [f"--property={p}" for p in properties]
        text = await self.run("systemctl", "show", unit, *args)
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


@contextlib.asynccontextmanager
async def booted(binds: dict[Path, str], name: str) -> AsyncIterator[Container]:
    """Boot systemd on an overlay of ROOT with `binds` (host path -> container path, read-only),
    wait for the boot to finish, and power it off on the way out."""
    _make_state_dir()
    bind_args = [f"--bind-ro={host}:{inside}" for host, inside in binds.items()]
    nspawn = await asyncio.create_subprocess_exec(
        "systemd-nspawn",
        "--keep-unit",
        "--register=no",
        "--console=passive",
        "--volatile=overlay",
        f"--machine={name}",
        *bind_args,
        "-b",
        "-D",
        str(ROOT),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        container = Container(await _init_pid(nspawn))
        await _wait_for_boot(container)
        yield container
    finally:
        await _power_off(nspawn)


def _make_state_dir() -> None:
    """nspawn keeps per-machine state here; a host without systemd may lack the directory."""
    Path("/run/systemd/nspawn").mkdir(parents=True, exist_ok=True)


async def _init_pid(nspawn: asyncio.subprocess.Process) -> int:
    """The host PID of the container's systemd: nspawn's child once it has exec'd systemd."""
    deadline = asyncio.get_running_loop().time() + BOOT_TIMEOUT_S
    while asyncio.get_running_loop().time() < deadline:
        assert nspawn.returncode is None, f"systemd-nspawn exited with {nspawn.returncode}"
        for child in psutil.Process(nspawn.pid).children():
            with contextlib.suppress(psutil.NoSuchProcess):
                if child.name() == "systemd":
                    return int(child.pid)
        await asyncio.sleep(0.05)
    raise AssertionError(f"no systemd in the container within {BOOT_TIMEOUT_S} s")


async def _wait_for_boot(container: Container) -> None:
    """Until systemd has finished booting; before it listens, systemctl cannot connect."""
    deadline = asyncio.get_running_loop().time() + BOOT_TIMEOUT_S
    state = ""
    while asyncio.get_running_loop().time() < deadline:
        state = await container.run("systemctl", "is-system-running", "--wait", check=False)
        if state.strip() in ("running", "degraded"):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the container did not boot within {BOOT_TIMEOUT_S} s: {state}")


async def _power_off(nspawn: asyncio.subprocess.Process) -> None:
    """SIGTERM asks nspawn for a clean container shutdown; SIGKILL if it does not come."""
    if nspawn.returncode is not None:
        return
    nspawn.terminate()
    try:
        await asyncio.wait_for(nspawn.wait(), 30)
    except TimeoutError:
        nspawn.kill()
        await nspawn.wait()
