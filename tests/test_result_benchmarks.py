"""The worker processes of the result benchmarks' ``--jobs`` (benchmarks/result_benchmarks.py)
under a stop signal: the runs stop as a training run does, the runs not started never start, an
idle worker stays, and the main process collects what the runs return instead of ending at once."""

import os
import signal
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import result_benchmarks  # noqa: E402


def wait_for_a_stop(ready: str, seconds: float) -> str:
    """In a worker: flag SIGTERM as a training run's handler does, say so by creating ``ready``,
    then wait up to ``seconds`` for the signal."""
    received = []
    signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    Path(ready).touch()
    deadline = time.monotonic() + seconds
    while not received and time.monotonic() < deadline:
        time.sleep(0.01)
    return "stopped" if received else "not signalled"


def started(pool, ready: list[Path]) -> list:
    """Submit one :func:`wait_for_a_stop` per ``ready`` path; return their futures once all run."""
    futures = [pool.submit(wait_for_a_stop, str(path), 120) for path in ready]
    deadline = time.monotonic() + 120
    while not all(path.exists() for path in ready) and time.monotonic() < deadline:
        time.sleep(0.01)
    return futures


def test_sigterm_to_the_main_process_stops_the_running_calls_and_an_idle_worker_stays(tmp_path):
    """Three workers, two calls: SIGTERM to the main process alone reaches both calls (through
    the main process) and leaves the idle worker alone; afterwards the main process's handler is back."""
    before = signal.getsignal(signal.SIGTERM)
    with result_benchmarks.executor(3) as pool:
        futures = started(pool, [tmp_path / "ready0", tmp_path / "ready1"])
        os.kill(os.getpid(), signal.SIGTERM)
        assert result_benchmarks.collect(futures, "bench") == ["stopped", "stopped"]
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_stop_signal_to_the_process_group_cancels_the_calls_not_started(tmp_path):
    """Two workers, three calls: SIGTERM to every process (as SLURM and ``timeout`` send it)
    stops the two running calls, the third never starts (whether the pool had handed it to a
    worker ahead of time or not), and collecting the results ends the program with one line."""
    with result_benchmarks.executor(2) as pool:
        futures = started(pool, [tmp_path / "ready0", tmp_path / "ready1"])
        waiting = pool.submit(wait_for_a_stop, str(tmp_path / "ready2"), 120)
        deadline = time.monotonic() + 2
        while not waiting.running() and time.monotonic() < deadline:
            time.sleep(0.01)  # CPython's pool hands a call to a busy worker's queue ahead of time
        for pid in [*pool._processes, os.getpid()]:  # the group: each worker, then this process
            os.kill(pid, signal.SIGTERM)
        assert [future.result(timeout=120) for future in futures] == ["stopped", "stopped"]
        with pytest.raises(SystemExit, match="bench: stopped by a signal before every run had started; "
                                             "run the same command again to continue"):
            result_benchmarks.collect([*futures, waiting], "bench")
    assert not (tmp_path / "ready2").exists()
