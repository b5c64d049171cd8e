"""Shared test helpers: run the repository's scripts in a subprocess, as a user would."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Small, fast toy settings every subprocess smoke run starts from.
TOY_FAST = ["--iters", "6", "--batch-size", "2", "--lr", "0.01", "--eval-every", "0", "--log-every", "2",
            "--workers", "0", "--device", "cpu"]


def run_script(script, *args, env=None, timeout=600):
    """Run `python <script> args...` from the repository root; returns the CompletedProcess."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, env=full_env, timeout=timeout)


@pytest.fixture
def run():
    return run_script


def assert_user_error(result, *fragments):
    """The standard for bad input: exit code 2, no traceback, one line `error: ...` holding each fragment."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for fragment in fragments:
        assert str(fragment) in lines[0], lines[0]


def pytest_configure(config):
    # the fast tier is `pytest -m "not slow"`; CI runs everything
    config.addinivalue_line("markers", "slow: runs the scripts in a subprocess, torchrun, signals, the benchmark "
                                       "pipeline, MiT-B5, or takes more than ~1.5 s (skipped by -m 'not slow')")
