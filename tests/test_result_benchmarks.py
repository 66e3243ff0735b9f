"""The worker processes of the result benchmarks' ``--jobs`` (benchmarks/result_benchmarks.py)
under a stop signal: the runs stop as a training run does, the runs not started never start, an
idle worker stays, and the main process collects what the runs return instead of ending at once.
A run that fails does not stop the others: every run ends, then one line names the failed ones."""

import os
import signal
import sys
import time
from concurrent.futures import CancelledError, Future
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


def fail_soon(message: str) -> None:
    """In a worker: fail as a run out of GPU memory does, a moment after starting."""
    time.sleep(0.2)
    raise MemoryError(message)


def exit_with(message: str) -> None:
    """In a worker: end as a stopped training run does, with a SystemExit naming where it stopped."""
    raise SystemExit(message)


def leave_marker(path: str) -> str:
    """In a worker: run a moment, then create ``path`` (the run's record) and return its name."""
    time.sleep(0.5)
    Path(path).touch()
    return Path(path).name


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


def test_a_failed_call_does_not_stop_the_others_and_collect_ends_with_one_line(tmp_path, capsys):
    """Two workers, five calls: the first fails early; the other four, three of them queued behind
    it, still run, and collecting them prints the failure's traceback, then ends with one line that
    names the failed call and its exception."""
    markers = [tmp_path / f"record{index}" for index in range(1, 5)]
    with result_benchmarks.executor(2) as pool:
        futures = [pool.submit(fail_soon, "out of memory\nsecond line"),
                   *(pool.submit(leave_marker, str(path)) for path in markers)]
        with pytest.raises(SystemExit) as exit_info:
            result_benchmarks.collect(futures, "bench", ["QAD, seed 1", *(f"QAT, seed {i}" for i in range(1, 5))])
    message = str(exit_info.value)
    assert message == ("bench: 1 of 5 runs failed (QAD, seed 1: MemoryError: out of memory); the finished runs "
                       "kept their records: run the same command again to retry the rest")
    assert all(path.exists() for path in markers)
    assert [future.result() for future in futures[1:]] == [path.name for path in markers]
    errors = capsys.readouterr().err
    assert "bench: QAD, seed 1 failed:" in errors and "in fail_soon" in errors  # the worker's traceback
    assert "MemoryError: out of memory" in errors


def test_a_call_ending_with_a_message_is_reported_by_its_message(tmp_path, capsys):
    """A call's SystemExit with a message (a stopped training run's line) is printed as that line,
    without a traceback, and named with its type in the last line; the call after it still runs."""
    stopped = "bench: QAD stopped at iteration 3 of 5; run the same command again to continue it"
    with result_benchmarks.executor(2) as pool:
        futures = [pool.submit(exit_with, stopped), pool.submit(leave_marker, str(tmp_path / "record"))]
        with pytest.raises(SystemExit, match=r"^bench: 1 of 2 runs failed \(run 1: SystemExit: bench: QAD stopped "
                                             r"at iteration 3 of 5; run the same command again to continue it\)"):
            result_benchmarks.collect(futures, "bench")
    assert (tmp_path / "record").exists()
    errors = capsys.readouterr().err
    assert errors == stopped + "\n"


def test_a_stop_signal_is_the_reason_given_when_calls_also_failed(capsys):
    """A call a stop signal kept from starting and a failed call: the one line is the stop's."""
    failed, not_started, finished = Future(), Future(), Future()
    failed.set_exception(MemoryError("out of memory"))
    not_started.set_exception(CancelledError())
    finished.set_result("done")
    with pytest.raises(SystemExit, match="^bench: stopped by a signal before every run had started; "
                                         "run the same command again to continue$"):
        result_benchmarks.collect([failed, not_started, finished], "bench")
    assert "MemoryError: out of memory" in capsys.readouterr().err
