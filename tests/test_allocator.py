"""keep_freed_memory: freed CPU blocks stay in the process (glibc), user settings win."""

import os
import platform
import subprocess
import sys

import pytest

from eigensam import allocator, console

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Resident growth (MiB) at the peak of 64 blocks of 2 MiB and after they are freed.
SCRIPT = """
import sys, torch
from eigensam.allocator import keep_freed_memory
def rss():
    with open("/proc/self/status") as status:
        return next(int(l.split()[1]) for l in status if l.startswith("VmRSS:")) / 1024
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
before = rss()
blocks = [torch.ones(2**19) for _ in range(64)]
peak = rss()
del blocks
print(applied, peak - before, rss() - before)
"""


def freed_memory(how):
    env = {k: v for k, v in os.environ.items() if k not in allocator.USER_SETTINGS}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, how], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0] == "True", float(out[1]), float(out[2])


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_freed_blocks_stay_resident_only_when_kept():
    applied, peak, after = freed_memory("keep")
    assert applied
    assert peak > 100 and after > 0.9 * peak  # kept for reuse
    applied, peak, after = freed_memory("default")
    assert not applied
    assert peak > 100 and after < 0.2 * peak  # glibc's default hands them back


@pytest.mark.parametrize("name", allocator.USER_SETTINGS)
def test_the_users_malloc_settings_win(monkeypatch, name):
    monkeypatch.setenv(name, "131072")
    assert allocator.keep_freed_memory() is False


def test_the_command_keeps_freed_memory(monkeypatch):
    calls = []
    monkeypatch.setattr(console, "keep_freed_memory", lambda: calls.append(1))
    assert console.main(["--help"]) == 0
    assert calls == [1]
