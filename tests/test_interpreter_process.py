"""Runs tests/test_triton_kernels.py in a fresh process with TRITON_INTERPRET=1 set before triton is imported
(the interpreter is chosen at import time, so it cannot be switched on inside this process)."""

import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).parent


def test_triton_kernels_in_interpreter_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:warnings",
                          str(HERE / "test_triton_kernels.py")], cwd=HERE, env=env, capture_output=True,
                         text=True, timeout=1500)
    tail = (run.stdout[-6000:] + "\n" + run.stderr[-3000:])
    assert run.returncode == 0, tail
    assert " passed" in run.stdout and " skipped" not in run.stdout.splitlines()[-1], tail
