"""Runs the Triton interpreter suites (tests/test_triton_kernels.py, tests/test_fp8_kernels.py,
tests/test_decode_kernel.py, tests/test_prepass_kernels.py) each in a fresh process with TRITON_INTERPRET=1 set
before triton is imported (the interpreter is chosen at import time, so it cannot be switched on inside this
process)."""

import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).parent


@pytest.mark.parametrize("suite", ["test_triton_kernels.py", "test_fp8_kernels.py", "test_decode_kernel.py",
                                   "test_prepass_kernels.py"])
def test_triton_kernels_in_interpreter_process(suite):
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:warnings",
                          str(HERE / suite)], cwd=HERE, env=env, capture_output=True, text=True, timeout=1500)
    tail = (run.stdout[-6000:] + "\n" + run.stderr[-3000:])
    assert run.returncode == 0, tail
    assert " passed" in run.stdout and " skipped" not in run.stdout.splitlines()[-1], tail
