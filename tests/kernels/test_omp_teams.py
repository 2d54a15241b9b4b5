"""A thread that hands the cores over lets go of its OpenMP team (kernels/omp_teams.py).

Each check runs in a fresh interpreter, where the only threads are the ones it makes: a team shows up as
worker threads in /proc/self/task, one fewer than torch's thread count."""

import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.get_num_threads() < 2, reason="one thread: OpenMP makes no team")

PRELUDE = textwrap.dedent(
    """
    import os, threading, time
    import torch

    torch.set_num_threads(2)

    def threads():
        return len(os.listdir("/proc/self/task"))

    def settled(want):  # a released team's workers exit a moment after the release returns
        deadline = time.monotonic() + 60
        while threads() != want and time.monotonic() < deadline:
            time.sleep(0.01)
        return threads()

    def parallel_op():
        x = torch.ones(1 << 22)
        (x + x).sum()  # past torch's grain size: an OpenMP parallel region
    """
)


def run(script: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return out.stdout.split()


def test_a_thread_that_ran_a_parallel_op_keeps_its_team_until_it_releases_it():
    kept, released = run(
        """
        from hotlora.kernels.omp_teams import release_thread_team

        go, done, end = threading.Event(), threading.Event(), threading.Event()

        def worker():
            parallel_op()
            go.set()
            done.wait()
            release_thread_team()
            go.set()
            end.wait()  # alive until counted

        before = threads()
        threading.Thread(target=worker, daemon=True).start()
        go.wait(); go.clear()
        print(settled(before + 2) - before)  # the thread and its team's one worker
        done.set(); go.wait()
        print(settled(before + 1) - before)  # the thread alone
        end.set()
        """
    )
    assert (kept, released) == ("2", "1")


def test_a_training_loop_and_the_engine_hold_no_team_while_the_other_runs():
    """PreemptibleRun: the engine (here the main thread) releases its team before a unit, the loop releases
    its own before handing back; so between units only the parked loop thread is left."""
    after_unit, after_end = run(
        """
        from hotlora.adapters.training.train_units import PreemptibleRun

        parallel_op()  # the engine's team
        baseline = settled(threads())

        def loop():
            parallel_op()  # the loop's team
            yield
            parallel_op()

        run = PreemptibleRun(loop, budget_s=10.0)
        run.advance()
        print(settled(baseline) - baseline)  # + the parked loop thread, - the engine's worker
        parallel_op()  # the engine serves a step: its team again
        while run.advance():
            pass
        parallel_op()  # the next step
        print(settled(baseline) - baseline)  # the loop thread has ended, the engine's team is back
        """
    )
    assert (after_unit, after_end) == ("0", "0")
