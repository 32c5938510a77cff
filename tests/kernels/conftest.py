"""The kernel tests' seeds: the CUDA-only tests (test_gpu.py) draw fresh inputs every run, and the terminal
summary lists each test's seed, so a failure on the rare GPU run can be reproduced from its log."""

from __future__ import annotations

import random

import pytest
import torch

SEEDS = pytest.StashKey[dict]()


def pytest_configure(config) -> None:
    config.stash[SEEDS] = {}


@pytest.fixture
def seed(request) -> int:
    """A fresh seed each run, so each run draws new inputs; listed in the summary (and in the JUnit XML as the
    test's ``seed`` property) to reproduce it."""
    value = random.SystemRandom().randrange(2**31)
    torch.manual_seed(value)
    request.config.stash[SEEDS][request.node.nodeid] = value
    request.node.user_properties.append(("seed", value))
    return value


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    seeds = config.stash.get(SEEDS, {})
    if seeds:
        terminalreporter.write_sep("-", f"seeds of {len(seeds)} tests (torch.manual_seed)")
        for node, value in seeds.items():
            terminalreporter.write_line(f"{node}: seed {value}")
