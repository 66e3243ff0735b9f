"""One writer per checkpoint directory: a lock file in it that names the run holding it.

    with hold(directory, "checkpoint.save"):   # on every rank of the job; "--save" for flags
        ...                                     # train, save checkpoints, write reports

Two runs given one ``checkpoint.save`` (``--save``) would resume from each other's iterations,
replace each other's ``iter_*`` checkpoints and report figures for checkpoints no longer their own.
The first run's rank 0 therefore creates ``DIRECTORY/writer.lock``, naming its host, PID and start
time; a second run is refused in one line (a :class:`~megatron_qad.config.ConfigError` on every
rank) before it writes anything there. The lock is released when the block ends, also on the
exits Megatron's signal handler and the divergence policy make.

- **Atomic, also on a shared file system.** The holder's record is written under a name of its own
  and hard-linked to ``writer.lock``: the link fails when the lock exists, and a reader never sees
  a half-written one (NFS makes ``link`` atomic, where ``O_EXCL`` was not always).
- **One job, many ranks.** Rank 0 takes the lock; the outcome is broadcast, so every rank either
  goes on or raises the same error.
- **Stale locks.** A run killed outright (SIGKILL, a lost node) leaves its lock. On the lock's own
  host it is stale when its PID is gone or now belongs to a process started later; elsewhere,
  when its holder has not renewed it for :data:`STALE_AFTER_S` (rank 0 touches it every
  :data:`HEARTBEAT_S`; the age is the lock's modification time against that of a file just written
  beside it, both on the file system's clock, so hosts' clocks need not agree). A stale lock is
  taken over with one line saying whose it was. A holder stopped for longer than the bound (e.g.
  a suspended job) can lose its lock to a run on another host.
- **Re-entrant in a process**: the recipe door holds ``checkpoint.save`` around its runs, and each
  run holds its ``--save``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import threading
from datetime import datetime, timezone
from pathlib import Path

import psutil
import torch
import torch.distributed as dist

from ..config import ConfigError

LOCK_NAME = "writer.lock"
HEARTBEAT_S = 30.0
"""How often the holder renews its lock's modification time."""
STALE_AFTER_S = 600.0
"""A lock of another host not renewed for this long belongs to a run that is gone."""


@dataclasses.dataclass
class _Held:
    """A lock this process holds: its record, how many blocks hold it, its heartbeat."""

    record: dict
    count: int
    stop: threading.Event
    heartbeat: threading.Thread


_held: dict[Path, _Held] = {}


def setting_name(key: str, directory: str | Path) -> str:
    """How messages name the directory: ``'checkpoint.save' (DIR)`` for a recipe key, ``--save DIR``
    for a Megatron flag."""
    return f"{key} {directory}" if key.startswith("--") else f"'{key}' ({directory})"


def _own_record() -> dict:
    """This process as a lock holder: host, PID, its creation time (to tell a reused PID), the time."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "created": psutil.Process().create_time(),
            "since": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}


def _holder(record: dict) -> str:
    return f"pid {record.get('pid')} on {record.get('host')}, started {record.get('since')}"


def _read(lock: Path) -> dict | None:
    """The record of ``lock``; None when there is none. ConfigError when it is not a lock's record."""
    try:
        text = lock.read_text()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
        if not isinstance(record, dict) or not {"host", "pid"} <= record.keys():
            raise ValueError
    except ValueError:
        raise ConfigError(f"{lock} is not a lock file this package wrote; delete it if no run writes "
                          f"{lock.parent}") from None
    return record


def _process_alive(record: dict) -> bool:
    """Whether the process of ``record`` (on this host) still runs: its PID exists and was created
    when the record says (not reused by a later process)."""
    try:
        created = psutil.Process(int(record["pid"])).create_time()
    except (psutil.NoSuchProcess, ValueError):
        return False
    except psutil.AccessDenied:  # another user's process with that PID: assume it is the holder
        return True
    return abs(created - float(record.get("created", created))) < 1.0


def _stale(record: dict, lock: Path, now_file: Path) -> bool:
    """Whether the run that wrote ``record`` is gone (see the module docstring); ``now_file``: a
    file just written beside ``lock`` (the file system's present time)."""
    if record["host"] == socket.gethostname():
        # this process's own record is a leftover: acquire() saw that it holds no lock there
        return int(record["pid"]) == os.getpid() or not _process_alive(record)
    try:
        age = now_file.stat().st_mtime - lock.stat().st_mtime
    except FileNotFoundError:
        return False  # released meanwhile: the next try takes it
    return age > STALE_AFTER_S


def _take_over(lock: Path, record: dict, aside: Path) -> bool:
    """Move the stale ``lock`` (holding ``record``) out of the way; False when what was moved is
    another run's newer lock (put back) or the lock was gone already."""
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return False
    try:
        if _read(aside) == record:
            return True
        with contextlib.suppress(FileExistsError):
            os.link(aside, lock)
        return False
    finally:
        aside.unlink(missing_ok=True)


def acquire(directory: str | Path, name: str) -> str | None:
    """Take the lock of ``directory`` (created if missing) for this process; ``name``: the
    directory as messages name it (:func:`setting_name`). Returns the line to print when a stale
    lock was taken over, else None. ConfigError when another run holds it."""
    directory = Path(directory).resolve()
    if directory in _held:
        _held[directory].count += 1
        return None
    lock = directory / LOCK_NAME
    record = _own_record()
    mine = directory / f"{LOCK_NAME}.{record['host']}.{record['pid']}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        mine.write_text(json.dumps(record))
    except OSError as err:
        raise ConfigError(f"{name} cannot hold this run's lock file {lock}: {err.strerror}; choose a "
                          f"writable directory") from None
    notice = None
    try:
        for _ in range(5):
            try:
                os.link(mine, lock)
            except FileExistsError:
                pass
            else:
                _start_heartbeat(directory, record)
                return notice
            holder = _read(lock)
            if holder is None:
                continue  # released meanwhile
            if not _stale(holder, lock, mine):
                fresh = STALE_AFTER_S // 60
                raise ConfigError(f"{name} is in use by another run: {_holder(holder)} (lock file {lock}); wait for "
                                  f"it to end or give this run another directory (the lock of a run that died is "
                                  f"taken over: at once on its host, after {fresh:.0f} minutes without its "
                                  f"heartbeat from another)")
            if _take_over(lock, holder, directory / f"{LOCK_NAME}.stale.{record['host']}.{record['pid']}"):
                notice = (f"{name}: taking over the lock of a run that ended without releasing it "
                          f"({_holder(holder)})")
        raise ConfigError(f"{name}: runs keep taking and releasing its lock {lock}; start one run per directory")
    finally:
        mine.unlink(missing_ok=True)


def _start_heartbeat(directory: Path, record: dict) -> None:
    """Record the lock as held, renewed every :data:`HEARTBEAT_S` while it still names this process."""
    stop = threading.Event()
    lock = directory / LOCK_NAME

    def renew() -> None:
        while not stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError, ConfigError):
                if _read(lock) == record:
                    os.utime(lock)

    heartbeat = threading.Thread(target=renew, name=f"writer-lock {directory}", daemon=True)
    _held[directory] = _Held(record, 1, stop, heartbeat)
    heartbeat.start()


def release(directory: str | Path) -> None:
    """Release one hold of ``directory``'s lock; the last one removes the lock file, if it still
    names this process."""
    directory = Path(directory).resolve()
    held = _held[directory]
    held.count -= 1
    if held.count:
        return
    del _held[directory]
    held.stop.set()
    held.heartbeat.join()
    lock = directory / LOCK_NAME
    with contextlib.suppress(ConfigError):
        if _read(lock) == held.record:
            lock.unlink(missing_ok=True)


def _broadcast(value: str | None) -> str | None:
    """Rank 0's ``value`` on every rank of the default process group (as it is without one)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    device = None
    if dist.get_backend() == "nccl":  # before parallel.initialize: this rank's GPU, as it will pick
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    box = [value]
    dist.broadcast_object_list(box, src=0, device=device)
    return box[0]


@contextlib.contextmanager
def hold(directory: str | Path | None, key: str):
    """Hold ``directory``'s lock for the block, on every rank of the job (nothing without a
    directory). ``key``: the recipe key or Megatron flag that set it, for messages. Raises
    ConfigError on every rank when another run holds it."""
    if not directory:
        yield
        return
    name = setting_name(key, directory)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    error = notice = None
    if rank0:
        try:
            notice = acquire(directory, name)
        except ConfigError as err:
            error = str(err)
    error = _broadcast(error)
    if error:
        raise ConfigError(error)
    if notice:
        print(notice, flush=True)
    try:
        yield
    finally:
        if rank0:
            release(directory)
