"""odis's own local Ray must not outlive the command that started it.

`ray.init()` of a local instance starts the GCS, the raylet and its workers as children of the driver; a driver
killed with SIGKILL gets no `ray.shutdown()`, and Ray's dashboard and runtime-env agents then live on with no
parent. So a driver that starts its own local Ray also starts this watchdog: a separate process (its own session,
so a Ctrl-C of the terminal leaves it to the driver's clean shutdown) that keeps a list of the driver's
descendants and, when the driver is gone without saying goodbye, stops every one still running (SIGTERM, then
SIGKILL). A pipe tells the two apart: the driver writes one byte on a clean end; a dead driver's end of the pipe
closes with nothing written. Processes are named by (pid, start time), so a recycled pid is never signalled.

    guard = RayWatchdog.start()      # after ray.init(address="local")
    ...
    ray.shutdown(); guard.release()
"""
from __future__ import annotations

import os
import select
import subprocess
import sys
import time

POLL_S = 0.5      # how often the list of the driver's descendants is refreshed
GRACE_S = 3.0     # SIGTERM, then SIGKILL after this many seconds
_RELEASE = b"x"


class RayWatchdog:
    """The driver's handle on its watchdog process."""

    def __init__(self, proc: subprocess.Popen, write_fd: int):
        self.proc, self._fd = proc, write_fd

    @classmethod
    def start(cls) -> RayWatchdog:
        read_fd, write_fd = os.pipe()  # both ends non-inheritable: Ray's own children never hold the write end
        try:
            proc = subprocess.Popen([sys.executable, "-m", "odis.pipelines.ray_watchdog", str(os.getpid())],
                                    stdin=read_fd, stdout=subprocess.DEVNULL, start_new_session=True)
        except BaseException:
            os.close(write_fd)
            raise
        finally:
            os.close(read_fd)
        return cls(proc, write_fd)

    def release(self) -> None:
        """A clean end (after ray.shutdown): the watchdog exits without signalling anything."""
        if self._fd is None:
            return
        try:
            os.write(self._fd, _RELEASE)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _descendants(parent, seen: dict) -> None:
    """Add the parent's living descendants (pid -> create time) to `seen`, this process left out."""
    import psutil

    for child in parent.children(recursive=True):
        if child.pid != os.getpid():
            try:
                seen.setdefault(child.pid, child.create_time())
            except psutil.NoSuchProcess:
                pass


def stop_processes(seen: dict, grace: float = GRACE_S) -> list[int]:
    """SIGTERM each process of `seen` that still runs with the same start time, SIGKILL those left after
    `grace` seconds; returns the pids signalled."""
    import psutil

    alive = []
    for pid, created in seen.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == created:
                p.terminate()
                alive.append(p)
        except psutil.Error:
            pass
    _, left = psutil.wait_procs(alive, timeout=grace)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    return [p.pid for p in alive]


def watch(parent_pid: int, fd: int = 0) -> int:
    """Watch `parent_pid` until it releases us (exit 0) or dies (its descendants stopped; exit 0)."""
    import signal

    import psutil

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver's Ctrl-C is the driver's to handle
    try:
        parent = psutil.Process(parent_pid)
    except psutil.NoSuchProcess:
        return 0
    seen: dict[int, float] = {}
    while True:
        try:
            _descendants(parent, seen)
        except psutil.NoSuchProcess:
            pass
        ready, _, _ = select.select([fd], [], [], POLL_S)
        if ready:
            if os.read(fd, 1) == _RELEASE:
                return 0
            break  # end of file: the driver died
        if not parent.is_running():
            break
    time.sleep(POLL_S)  # let Ray's own fate-sharing go first; what is left is ours to stop
    stop_processes(seen)
    return 0


if __name__ == "__main__":
    sys.exit(watch(int(sys.argv[1])))
