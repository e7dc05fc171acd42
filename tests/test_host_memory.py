"""`keep_freed_memory`: a CPU step re-allocating the tensors it freed reuses their pages instead of faulting
them back in from the kernel."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from mta_cli import host_memory

# A step's pattern: two 64 MiB tensors allocated and freed, 30 rounds. Prints the minor page faults of the last
# 10, once the heap has reached its steady state (glibc's aligned allocations need a few rounds to coalesce).
ROUNDS = """
import json, resource, sys, torch
from mta_cli.host_memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    x = torch.ones(16 * 2**20); y = x * 2; del x, y
before = faults()
for _ in range(10):
    x = torch.ones(16 * 2**20); y = x * 2; del x, y
print(json.dumps({"applied": applied, "faults": faults() - before}))
"""
PAGES = 10 * 2 * 64 * 2**20 // 4096   # every round faults its 2 x 16 K pages back in by default


def faults_of_rounds(mode: str, **env) -> dict:
    out = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    return json.loads(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_tensors_are_reused_without_page_faults():
    default, kept = faults_of_rounds("default"), faults_of_rounds("keep")
    assert kept["applied"] and not default["applied"]
    assert default["faults"] > 0.9 * PAGES
    assert kept["faults"] < 0.01 * PAGES


def test_the_users_malloc_settings_win(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "65536")
    assert host_memory.keep_freed_memory() is False
    if platform.libc_ver()[0] == "glibc":
        assert faults_of_rounds("keep", MALLOC_MMAP_MAX_="65536")["faults"] > 0.9 * PAGES
