"""A reader that goes away (``iovirt ... | head -1``) ends iovirt quietly, without a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from iovirt.cli import EXIT_BROKEN_PIPE


@pytest.mark.parametrize("read_first_line", [False, True])
def test_a_closed_pipe_ends_the_command_without_a_traceback(read_first_line):
    proc = subprocess.Popen([sys.executable, "-m", "iovirt", "conform", "--coverage"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    if read_first_line:
        proc.stdout.readline()
    proc.stdout.close()  # before the child's first write, or after its first line
    err = proc.stderr.read().decode()
    assert proc.wait(60) in (0, EXIT_BROKEN_PIPE)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
