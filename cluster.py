"""What a shared cluster does to a run: preemption signals, and two runs into one folder.

Concern: the faults that come from outside the run (checkpoint.py handles those of the disk).

* **Preemption.** SLURM sends SIGTERM (or the signal its ``--signal`` names, e.g. SIGUSR1)
  some time before SIGKILL; Kubernetes sends SIGTERM; torchrun forwards the signals it handles
  to its workers. ``PreemptionSignals`` turns them into a flag: the loop finishes its step,
  the ranks agree (``agreed``: one all-reduce of a CPU integer per step, so a rank that got
  the signal a step later still stops at the same step as the others), ``last.pt`` is saved
  and every rank exits with status ``PREEMPTED`` (75, sysexits' EX_TEMPFAIL: "try again"),
  leaving ``OUT/PREEMPTED`` for a requeue script that only sees torchrun's own status.
* **One run per folder.** ``RunLock`` holds an advisory lock (``fcntl.lockf``) on
  ``OUT/LOCK``, which names the holder (pid, host, start). A second run into the folder is
  refused with that name. The kernel drops the lock when its holder dies, however it dies, so
  the lock of a killed run is stale by construction and the next run takes it over.

    with RunLock(out, holder=rank == 0), PreemptionSignals() as signals:
        ...
        if signals.agreed():          # every rank, after every step
            save(...); raise SystemExit(PREEMPTED)
"""
import datetime
import errno
import fcntl
import os
import signal
import socket
import threading

import torch
import torch.distributed as dist

PREEMPTED = 75                                  # the exit status of a preempted run
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)      # what schedulers send before SIGKILL


# =============================================================== preemption
class PreemptionSignals:
    """SIGTERM / SIGUSR1 set ``received`` instead of ending the process, for the duration of
    a ``with`` block (the previous handlers come back after it). Outside the main thread
    Python cannot install handlers, and the block changes nothing."""

    def __init__(self, signals=SIGNALS):
        self.signals, self.received, self._previous = signals, 0, {}

    def _note(self, signum, frame):
        self.received = self.received or signum            # the first signal is the one named

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._note) for s in self.signals}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():       # None: installed outside Python
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def agreed(self, group=None):
        """The signal any rank has received (0: none), the same on every rank. Called by every
        rank after every step: a CPU all-reduce (on ``group``; gloo), no device sync."""
        if not (dist.is_available() and dist.is_initialized()):
            return self.received                            # one process: nothing to agree on
        flag = torch.tensor([self.received])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return int(flag)


def ignore_preemption_signals(worker_id=None):
    """Data-loader workers ignore the signals: SLURM signals every process of a job step, and
    a worker that died of it would fail the batch the training process is still waiting for.
    The training process ends its workers itself (DataLoader ``worker_init_fn``): they leave on
    its sentinel, or when they see it gone; only a worker stuck in a read outlives PyTorch's
    last-resort SIGTERM, until the job's SIGKILL."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def signal_name(signum):
    return signal.Signals(signum).name


# ============================================================= the run lock
class RunLock:
    """An exclusive lock on ``out`` for the ``with`` block (only where ``holder``: rank 0 of a
    run). Creates ``out`` if needed; on leaving, removes LOCK (and ``out`` if the run left it
    empty and created it). Refuses with SystemExit naming the holder if another live process
    holds it; takes over, with a note, a LOCK left by a process that died."""

    def __init__(self, out, holder=True):
        self.out, self.holder, self.fd = out, holder, None
        self.path = os.path.join(out, "LOCK")

    def __enter__(self):
        if not self.holder:
            return self
        self.created = not os.path.isdir(self.out)
        os.makedirs(self.out, exist_ok=True)
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                if e.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
                raise SystemExit(f"error: --out {self.out} is in use by another run ({holder}); "
                                 "wait for it to end, or give another --out") from None
            # A holder that was leaving may have removed the file we opened: lock the one on disk.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
            else:
                os.close(fd)
        stale = os.pread(self.fd, 512, 0).decode(errors="replace").strip()
        if stale:
            print(f"note: took over the lock of a run that ended without releasing it "
                  f"({stale})", flush=True)
        me = (f"pid {os.getpid()} on {socket.gethostname()}, since "
              f"{datetime.datetime.now().isoformat(timespec='seconds')}")
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, me.encode() + b"\n", 0)
        os.fsync(self.fd)
        return self

    def __exit__(self, *exc):
        if self.fd is None:
            return
        os.remove(self.path)                 # while holding it: no one can have taken it
        os.close(self.fd)
        self.fd = None
        if self.created and not os.listdir(self.out):
            os.rmdir(self.out)
