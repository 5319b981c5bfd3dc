"""``@pytest.mark.isolated``: the test body runs in a forked child, so a crashing kernel fails that test only.

Why: a native kernel that faults (``_weight_int8pack_mm`` on a misaligned weight on AVX-512, issue 25)
kills the Python process; with the whole suite in one process, every test after it never ran and the
run ended in ``Fatal Python error: Segmentation fault`` with no test named. Here the parent sets the
test up (fixtures stay cached for the next test), forks, the child runs only the call phase, and the
parent turns a signal or a failure into this test's failure, by name, and goes on.

Why not pytest-forked: with pytest 9.2 its child cannot marshal the report (``NodeId`` is not
marshallable), so every forked test fails with "EXITED with status 3"; and it runs setup in the child,
where an OpenMP pool the parent already started is gone and the first parallel region deadlocks
(libgomp is not fork-safe). The child here runs with one torch thread, which never enters a parallel region.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import traceback

import pytest

MARKER = "isolated"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARKER}: run the test body in a forked child (a kernel crash fails it alone)")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    if pyfuncitem.get_closest_marker(MARKER) is None or not hasattr(os, "fork"):
        return None
    args = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    with tempfile.TemporaryFile("w+") as outcome:
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            os._exit(_run_child(pyfuncitem.obj, args, outcome))
        _, status = os.waitpid(pid, 0)
        outcome.seek(0)
        message = outcome.read()
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        pytest.fail(f"{pyfuncitem.nodeid}: the test process died with {name} (a native crash)", pytrace=False)
    code = os.WEXITSTATUS(status)
    if code == _SKIPPED:
        pytest.skip(message)
    if code != 0:
        pytest.fail(f"{pyfuncitem.nodeid} failed in its child process:\n{message}", pytrace=False)
    return True


_SKIPPED = 3


def _run_child(test, args: dict, outcome) -> int:
    """Run ``test(**args)`` with one torch thread; write what went wrong to ``outcome``; the exit code."""
    try:
        import torch

        torch.set_num_threads(1)  # the parent's OpenMP pool did not survive the fork (see the module docstring)
        test(**args)
        return 0
    except pytest.skip.Exception as skipped:
        outcome.write(str(skipped))
        return _SKIPPED
    except BaseException:
        outcome.write(traceback.format_exc())
        return 1
    finally:
        outcome.flush()
        sys.stdout.flush()
        sys.stderr.flush()
