"""The Celery app that ``benchmarks/throughput.py`` runs in ``celery worker`` subprocesses.

Configured only from ``BENCH_*`` environment variables (set by throughput.py), so the
same module serves both worker fleets; they differ in ONE app setting,
``reliable_idempotency_store`` (``BENCH_IDEMPOTENCY_STORE``: ``postgres`` or ``redis``):

* ``BENCH_BROKER_URL``          broker (db 0 of the throwaway broker redis-server)
* ``BENCH_STATS_URL``           where workers report completions (db 1 of the same server)
* ``BENCH_RELIABLE_REDIS_URL``  ``reliable_redis_url`` (a SEPARATE throwaway redis-server)
* ``BENCH_DATABASE_URL``        ``reliable_database_url`` (the throwaway PostgreSQL database)
* ``BENCH_IDEMPOTENCY_STORE``   ``reliable_idempotency_store``
* ``BENCH_PROFILE_DIR``         optional: cProfile each pool process, dump
                                ``<dir>/<hostname>-<pid>.prof`` when it exits
* ``BENCH_PROFILE_CLOCK``       ``wall`` (default) or ``cpu``: the profiler's clock
                                (``cpu`` = the pool process's main thread CPU time)

Every task is a no-op taking ``(run, n)``: ``run`` names the timed pass, ``n`` is unique
across the whole benchmark, so idempotent tasks are always first executions and lock
resources never contend. No result backend is configured and every task has
``ignore_result=True``: the benchmark measures task execution, not result storage.

Completion is measured by ``task_prerun``/``task_postrun`` receivers that only update a
dict in memory (identical cost for every contender, no I/O per task). A daemon thread per
pool process publishes the dict to ``BENCH_STATS_URL`` every 50 ms when it changed, as a
hash ``bench:stats:<run>`` with one field per process: ``"<ok> <other> <first> <last>"``
(completed tasks, tasks that ended in another state, wall-clock start of the first task,
wall-clock end of the last task).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import redis
from celery import Celery, signals

from celery_reliable import Backoff, ReliableTask

FLUSH_INTERVAL = 0.05
#: staging list of the contenders that draw from a queue bucket (benchmarks/run.py): the
#: bucket is keyed by the message's routing key, which is the list it was published to
LIMITED_STAGING = "bench.staging.limited"
#: queues of benchmarks/run.py's scale phase: ``scale.<k>`` is consumed by k workers
SCALE_QUEUES = ("scale.1", "scale.2", "scale.4")
SCALE_RATE = "50/s"


def env(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def build_app() -> Celery:
    app = Celery("bench", broker=env("BENCH_BROKER_URL", "memory://"))
    app.conf.update(
        result_backend=None,
        task_ignore_result=True,
        reliable_redis_url=env("BENCH_RELIABLE_REDIS_URL", "redis://127.0.0.1:6379/15"),
        reliable_database_url=env("BENCH_DATABASE_URL") or None,
        reliable_idempotency_store=env("BENCH_IDEMPOTENCY_STORE", "postgres"),
        reliable_key_prefix="bench",
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        # benchmarks/run.py: a queue bucket far above any offered rate for the limited
        # staging list, and the 50/s buckets of the scale phase
        reliable_queue_rate_limits={
            LIMITED_STAGING: {"rate": 1_000_000, "burst": 1_000_000},
            **dict.fromkeys(SCALE_QUEUES, env("BENCH_SCALE_RATE", SCALE_RATE)),
        },
        reliable_bulkheads={"bench": {"concurrent": 64, "queue": 64, "timeout": 60}},
        reliable_circuit_breakers={"bench": {}},
    )
    # the competitors of benchmarks/run.py, on the throwaway reliable redis-server
    once_url = env("BENCH_ONCE_URL") or env("BENCH_RELIABLE_REDIS_URL",
                                            "redis://127.0.0.1:6379/15")
    app.conf.ONCE = {"backend": "celery_once.backends.Redis",
                     "settings": {"url": once_url, "default_timeout": 60}}
    app.conf.singleton_backend_url = once_url
    app.conf.singleton_key_prefix = "bench-singleton:"
    return app


app = build_app()


@app.task(name="bench.plain", ignore_result=True)
def plain(run: str, n: int) -> None:
    """Plain Celery: the baseline."""


@app.task(name="bench.idempotent", base=ReliableTask, ignore_result=True, idempotency_key=True)
def idempotent(run: str, n: int) -> None:
    """Idempotent execution; the store (postgres or redis) is the worker's app setting."""


@app.task(name="bench.lock", base=ReliableTask, ignore_result=True, lock="bench:{n}")
def lock(run: str, n: int) -> None:
    """A fencing-token lock on a resource no other task uses (never contends)."""


# ------------------------------------------------------------------ benchmarks/run.py

try:  # optional (the ``bench`` extra); throughput.py does not need them
    from celery_once import QueueOnce
    from celery_singleton import Singleton
except ImportError:  # pragma: no cover
    QueueOnce = Singleton = None  # type: ignore[assignment,misc]

BACKOFF = Backoff.exponential(base=2, cap=60, jitter="full", max_attempts=5)

if QueueOnce is not None:
    @app.task(name="bench.once", base=QueueOnce, ignore_result=True)
    def once(run: str, n: int) -> None:
        """celery-once: lock taken at publish time, released when the task returns."""

    @app.task(name="bench.singleton", base=Singleton, ignore_result=True)
    def singleton(run: str, n: int) -> None:
        """celery-singleton: lock taken at publish time, released on success/failure."""


@app.task(name="bench.bucket", base=ReliableTask, ignore_result=True)
def bucket(run: str, n: int) -> None:
    """Only the queue bucket (published to LIMITED_STAGING, whose bucket is 1,000,000/s)."""


@app.task(name="bench.window", base=ReliableTask, ignore_result=True,
          rate_limit_window="100000000/m")
def window(run: str, n: int) -> None:
    """Only an exact sliding window per task name, far above any offered rate (its log
    holds every admission of the last minute)."""


@app.task(name="bench.bulkhead", base=ReliableTask, ignore_result=True, bulkhead="bench")
def bulkhead(run: str, n: int) -> None:
    """Only a bulkhead tier of 64 slots (above the fleet's concurrency)."""


@app.task(name="bench.backoff", base=ReliableTask, ignore_result=True, backoff=BACKOFF)
def backoff(run: str, n: int) -> None:
    """Only a backoff policy (the body never fails, so it never retries)."""


@app.task(name="bench.all", base=ReliableTask, ignore_result=True, lock="bench:{n}",
          idempotency_key=True, bulkhead="bench", backoff=BACKOFF, circuit_breaker="bench")
def all_guards(run: str, n: int) -> None:
    """Every guard (published to LIMITED_STAGING for the queue bucket); the idempotency
    store is the worker's app setting."""


_rate_client: Any = None
_rate_client_pid = 0
_last_prerun = 0.0


def _record_start(run: str, sent: float) -> None:
    """Scale phase: push ``"<body start> <prerun->body s> <publish->body s>"``."""
    global _rate_client, _rate_client_pid
    now = time.time()
    if _rate_client is None or _rate_client_pid != os.getpid():
        _rate_client = redis.Redis.from_url(env("BENCH_STATS_URL", "redis://127.0.0.1:6379/15"))
        _rate_client_pid = os.getpid()
    _rate_client.rpush(f"bench:starts:{run}",
                       f"{now!r} {now - _last_prerun!r} {now - sent!r}")


@app.task(name="bench.rate_reliable", base=ReliableTask, ignore_result=True)
def rate_reliable(run: str, n: int, sent: float) -> None:
    """Scale phase: drawn from the fleet-wide bucket of its queue (``scale.<k>``: 50/s)."""
    _record_start(run, sent)


def _rate_celery(run: str, n: int, sent: float) -> None:
    """Scale phase: Celery's own ``rate_limit`` (per worker)."""
    _record_start(run, sent)


# one task name per scale queue: Celery's buckets are per task name and worker, so tasks
# left over from one scale run never share a bucket with the next run's
for _queue in SCALE_QUEUES:
    app.task(name=f"bench.rate_celery.{_queue}", ignore_result=True,
             rate_limit=SCALE_RATE)(_rate_celery)


# ------------------------------------------------------------------ measurement

# run -> [tasks ended in SUCCESS, tasks ended otherwise, first start, last end]
_stats: dict[str, list[float]] = {}
_dirty = threading.Event()
_flusher: threading.Thread | None = None
_flusher_pid = 0


def _run_of(args: Any, kwargs: Any) -> str | None:
    if args:
        return str(args[0])
    if kwargs and "run" in kwargs:
        return str(kwargs["run"])
    return None


@signals.task_prerun.connect
def _prerun(args: Any = None, kwargs: Any = None, **_: Any) -> None:
    global _last_prerun
    now = _last_prerun = time.time()
    run = _run_of(args, kwargs)
    if run is None:
        return
    entry = _stats.get(run)
    if entry is None:
        _stats[run] = [0, 0, now, now]
        _ensure_flusher()


@signals.task_postrun.connect
def _postrun(args: Any = None, kwargs: Any = None, state: Any = None, **_: Any) -> None:
    now = time.time()
    run = _run_of(args, kwargs)
    if run is None:
        return
    entry = _stats.get(run)
    if entry is None:
        return
    if state == "SUCCESS":
        entry[0] += 1
    else:
        entry[1] += 1
    entry[3] = now
    _dirty.set()


def _ensure_flusher() -> None:
    global _flusher, _flusher_pid
    if _flusher is not None and _flusher_pid == os.getpid() and _flusher.is_alive():
        return
    _flusher_pid = os.getpid()
    _flusher = threading.Thread(target=_flush_forever, name="bench-stats", daemon=True)
    _flusher.start()


def _flush_forever() -> None:
    client = redis.Redis.from_url(env("BENCH_STATS_URL", "redis://127.0.0.1:6379/15"))
    field = f"{socket.gethostname()}-{os.getpid()}"
    while True:
        _dirty.wait()
        time.sleep(FLUSH_INTERVAL)
        _dirty.clear()
        snapshot = [(run, list(entry)) for run, entry in list(_stats.items())]
        pipe = client.pipeline(transaction=False)
        for run, (ok, other, first, last) in snapshot:
            pipe.hset(f"bench:stats:{run}", field, f"{int(ok)} {int(other)} {first!r} {last!r}")
        try:
            pipe.execute()
        except redis.RedisError:
            _dirty.set()  # try again next time
            time.sleep(0.5)


# ------------------------------------------------------------------ profiling

_profiler: Any = None


@signals.worker_process_init.connect
def _start_profile(**_: Any) -> None:
    global _profiler
    if env("BENCH_PROFILE_DIR"):
        import cProfile

        clock = time.thread_time if env("BENCH_PROFILE_CLOCK") == "cpu" else time.perf_counter
        _profiler = cProfile.Profile(clock)
        _profiler.enable()


@signals.worker_process_shutdown.connect
def _dump_profile(**_: Any) -> None:
    if _profiler is not None:
        _profiler.disable()
        path = Path(env("BENCH_PROFILE_DIR"), f"{socket.gethostname()}-{os.getpid()}.prof")
        _profiler.dump_stats(str(path))


@signals.worker_ready.connect
def _ready(sender: Any = None, **_: Any) -> None:
    ready_dir = env("BENCH_READY_DIR")
    if ready_dir and sender is not None:
        Path(ready_dir, f"ready-{sender.hostname.split('@', 1)[0]}").touch()
