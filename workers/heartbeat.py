"""An rq ``SimpleWorker`` that keeps the heartbeat of its running job while the job executes.

rq's forking ``Worker`` renews a job's heartbeat from the parent process every
``job_monitoring_interval`` seconds, so a job whose worker died expires from the started-job
registry within about a minute and rq retries it or marks it failed (``AbandonedJobError``).
``SimpleWorker`` runs the job in its own thread and renews nothing: a killed worker leaves its
job "started" until the job timeout has passed, which is an hour for an extraction block.

`HeartbeatWorker` renews the heartbeat from a background thread instead, with a TTL of a few
intervals, so rq's own registry cleanup notices a killed worker within seconds.

rq also writes the worker's own registration (its hash and its entries in the worker sets, which
`rq.Worker.all` and ``GET /healthz`` read) only once, at start-up, and its worker heartbeat only
renews the hash. After a ``FLUSHALL``, or a restart of Redis without persistence, a running worker
would keep taking jobs while no longer listed. `HeartbeatWorker` checks its registration at each
of its own heartbeats, idle or busy, and writes it again when it is missing.
"""

from __future__ import annotations

import logging
import math
import threading
from types import TracebackType

from redis.client import Pipeline
from redis.exceptions import RedisError
from rq import SimpleWorker, worker_registration
from rq.executions import Execution
from rq.job import Job
from rq.queue import Queue
from rq.worker import WorkerStatus

from workers.errors import JobCanceledError

logger = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_INTERVAL = 30.0
# A job is abandoned after this many heartbeats in a row did not arrive.
MISSED_HEARTBEATS = 3
# Maximum wait, in seconds, of one read by the thread that listens for commands sent to the
# worker (rq's pubsub). rq waits 60 s, and a stopping worker sometimes waited that long for
# the read to end before it exited. Commands arrive as soon as they are sent either way.
COMMAND_POLL_SECONDS = 1.0


def heartbeat_ttl(interval: float) -> int:
    """Return the seconds a running job's heartbeat stays valid when renewed every ``interval``."""
    return max(2, math.ceil(interval * MISSED_HEARTBEATS))


class HeartbeatWorker(SimpleWorker):
    """A ``SimpleWorker`` whose running job is declared abandoned soon after the worker dies.

    Parameters
    ----------
    heartbeat_interval
        Seconds between two heartbeats of the running job, and between two heartbeats of the
        idle worker. The job counts as abandoned ``MISSED_HEARTBEATS`` intervals after the last
        heartbeat, and the idle worker's registration expires ``MISSED_HEARTBEATS`` intervals
        plus 60 seconds (rq's margin) after its last heartbeat.
    *args, **kwargs
        Passed to ``rq.SimpleWorker``. An explicit ``worker_ttl`` replaces the one derived from
        ``heartbeat_interval``.
    """

    def __init__(
        self,
        *args: object,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        **kwargs: object,
    ) -> None:
        if not heartbeat_interval > 0:
            raise ValueError(
                f"heartbeat_interval must be positive seconds, got {heartbeat_interval!r}"
            )
        # rq's __init__ reads dequeue_timeout, which depends on the interval, to set the
        # connection's socket timeout, so the interval is set first.
        self.heartbeat_interval = heartbeat_interval
        kwargs.setdefault("worker_ttl", heartbeat_ttl(heartbeat_interval))
        # A busy worker's hash lives job_monitoring_interval + 60 s from each job heartbeat, so
        # an interval above 90 s would let it expire between two beats.
        kwargs.setdefault("job_monitoring_interval", max(1, math.ceil(heartbeat_interval)))
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def handle_exception(
        self,
        job: Job,
        exc_type: type[BaseException],
        exc_value: BaseException,
        traceback: TracebackType | None,
    ) -> None:
        """Log a job stopped by a cancel in one INFO line, and any other error as rq does.

        rq logs every exception of a job at ERROR level with its traceback. A cancel is a
        requested end, and the job function already logged it, so it gets no traceback.
        Exception handlers pushed on the worker run in both cases.
        """
        if not isinstance(exc_value, JobCanceledError):
            super().handle_exception(job, exc_type, exc_value, traceback)
            return
        logger.info("Worker %s: rq job %s stopped by a cancel", self.name, job.id)
        for handler in self._exc_handlers:
            # rq's rule: a handler that returns a falsy value other than None ends the chain.
            go_on = handler(job, exc_type, exc_value, traceback)
            if go_on is not None and not go_on:
                break

    @property
    def stop_requested(self) -> bool:
        """Whether a warm shutdown was requested (SIGINT, SIGTERM or rq's shutdown command)."""
        # rq 3.0 sets these attributes on such a request.
        return bool(self._stop_requested or self._shutdown_requested_date is not None)

    @property
    def dequeue_timeout(self) -> int:
        """Seconds one blocking wait for a job lasts, which is the idle worker's heartbeat interval.

        rq sends the worker's heartbeat between two waits.
        """
        return max(1, math.ceil(self.heartbeat_interval))

    def heartbeat(self, timeout: int | None = None, pipeline: Pipeline | None = None) -> None:
        """Renew the worker's registration, and write it again if Redis lost it.

        rq calls this without a pipeline from its main loop, while idle and after each job.
        Calls with a pipeline (rq's job preparation and `maintain_heartbeats`) only queue the
        renewal. While a job runs, its heartbeat thread checks the registration instead.
        """
        ttl = timeout or self.worker_ttl + 60
        super().heartbeat(ttl, pipeline)
        if pipeline is None:
            self.ensure_registered(ttl)

    def ensure_registered(self, ttl: int) -> bool:
        """Write the worker's registration again if its hash or a worker-set entry is missing.

        rq's heartbeat sets one field of the hash, which recreates a deleted hash without its
        ``birth`` field, so a missing ``birth`` marks a lost hash. A worker that is stopping is
        left unregistered. Returns whether the registration was written.
        """
        # rq 3.0 sets these attributes when a warm shutdown is requested (SIGINT, SIGTERM or the
        # shutdown command), and birth_date in register_birth at start-up.
        if self.stop_requested or self.birth_date is None:
            return False
        queue_keys = [
            worker_registration.WORKERS_BY_QUEUE_KEY % name for name in self.queue_names()
        ]
        with self.connection.pipeline(transaction=False) as pipeline:
            pipeline.hexists(self.key, "birth")
            pipeline.sismember(self.redis_workers_keys, self.key)
            for key in queue_keys:
                pipeline.sismember(key, self.key)
            if all(pipeline.execute()):
                return False

        # The writes of rq's register_birth plus the state. The hash is updated in place, not
        # replaced, so it keeps the original birth date and any counter written since the loss.
        with self.connection.pipeline() as pipeline:
            pipeline.hset(self.key, mapping={**self.serialize(), "state": self.get_state()})
            worker_registration.register(self, pipeline)
            pipeline.expire(self.key, ttl)
            pipeline.execute()
        logger.info(
            "worker %s: registration missing from Redis, registered again on queues %s",
            self.name,
            ",".join(self.queue_names()),
        )
        return True

    def subscribe(self) -> None:
        """Listen for commands sent to this worker, with reads of at most a second."""
        self.log.info("Worker %s: subscribing to channel %s", self.name, self.pubsub_channel_name)
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        # rq declares the attribute as None only.
        self.pubsub_thread = self.pubsub.run_in_thread(  # type: ignore[assignment]
            sleep_time=COMMAND_POLL_SECONDS,
            daemon=True,
            exception_handler=self._pubsub_exception_handler,
        )

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        """Return the TTL of the job's heartbeat; the job timeout is enforced separately."""
        return heartbeat_ttl(self.heartbeat_interval)

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Run ``job`` in this process while a thread renews its heartbeat."""
        execution = self.prepare_execution(job)
        stop = threading.Event()
        beat = threading.Thread(
            target=self._beat, args=(job, execution, stop), name=f"heartbeat-{job.id}", daemon=True
        )
        beat.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            stop.set()
            beat.join()
        self.set_state(WorkerStatus.IDLE)

    def _beat(self, job: Job, execution: Execution, stop: threading.Event) -> None:
        failures = 0
        while not stop.wait(self.heartbeat_interval):
            try:
                # rq adds the execution with XX, so a beat that races the job's end does not
                # put a finished job back into the started-job registry.
                self.maintain_heartbeats(job, execution)
                # The same TTL as maintain_heartbeats gives the worker's hash.
                self.ensure_registered(self.job_monitoring_interval + 60)
            except RedisError:
                failures += 1
                # One line per failure streak: Redis being down would otherwise log every beat.
                if failures == 1:
                    logger.exception("worker %s: heartbeat of job %s failed", self.name, job.id)
                continue
            if failures:
                logger.info(
                    "worker %s: heartbeat of job %s restored after %d failures",
                    self.name,
                    job.id,
                    failures,
                )
                failures = 0
