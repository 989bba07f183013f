"""An rq ``SimpleWorker`` that keeps the heartbeat of its running job while the job executes.

rq's forking ``Worker`` renews a job's heartbeat from the parent process every
``job_monitoring_interval`` seconds, so a job whose worker died expires from the started-job
registry within about a minute and rq retries it or marks it failed (``AbandonedJobError``).
``SimpleWorker`` runs the job in its own thread and renews nothing: a killed worker leaves its
job "started" until the job timeout has passed, which is an hour for an extraction block.

`HeartbeatWorker` renews the heartbeat from a background thread instead, with a TTL of a few
intervals, so rq's own registry cleanup notices a killed worker within seconds.
"""

from __future__ import annotations

import logging
import math
import threading

from redis.exceptions import RedisError
from rq import SimpleWorker
from rq.executions import Execution
from rq.job import Job
from rq.queue import Queue
from rq.worker import WorkerStatus

logger = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_INTERVAL = 30.0
# A job is abandoned after this many heartbeats in a row did not arrive.
MISSED_HEARTBEATS = 3


def heartbeat_ttl(interval: float) -> int:
    """Return the seconds a running job's heartbeat stays valid when renewed every ``interval``."""
    return max(2, math.ceil(interval * MISSED_HEARTBEATS))


class HeartbeatWorker(SimpleWorker):
    """A ``SimpleWorker`` whose running job is declared abandoned soon after the worker dies.

    Parameters
    ----------
    heartbeat_interval
        Seconds between two heartbeats of the running job. The job counts as abandoned
        ``MISSED_HEARTBEATS`` intervals after the last heartbeat.
    *args, **kwargs
        Passed to ``rq.SimpleWorker``.
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
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.heartbeat_interval = heartbeat_interval

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
