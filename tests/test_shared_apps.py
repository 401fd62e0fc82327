"""Shared tasks and several apps in one process: each app validates and uses its own policy."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, _state, shared_task

from celery_reliable import ConfigurationError, ReliableTask
from celery_reliable.guards import breaker, bulkhead

TIER = {"concurrent": 2, "queue": 4, "timeout": 30}


@pytest.fixture(autouse=True)
def _no_leaked_shared_tasks() -> Iterator[None]:
    # A shared task registers a finalize callback for every future app of the
    # process; drop this module's ones so later tests' apps do not get them.
    before = set(_state._on_app_finalizers)
    yield
    _state._on_app_finalizers.intersection_update(before)


def make_app(main: str, redis_url: str = "redis://127.0.0.1:1/0", **conf: Any) -> Celery:
    app = Celery(main, broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.update(reliable_redis_url=redis_url, reliable_idempotency_store="redis",
                    reliable_key_prefix=f"sh{secrets.token_hex(3)}", **conf)
    return app


def declare(app: Celery, name: str, **options: Any) -> Any:
    """A shared task (Celery's default) declared on ``app``."""

    def job(self: Any, n: int) -> int:
        return n * 2

    return app.task(base=ReliableTask, bind=True, name=name, **options)(job)


def test_other_app_finalizes_and_declaring_app_still_runs(redis_url: str) -> None:
    """An app that never declared a shared task finalizes fine; the declaring app runs it."""
    name = f"shared.job.{secrets.token_hex(3)}"
    mine = make_app("mine", redis_url, reliable_bulkheads={"gold": TIER})
    declare(mine, name, bulkhead="gold", lock="job:{n}")
    other = make_app("other")  # no tier "gold": the task does not fit this app
    other.finalize()  # used to raise ConfigurationError about a task it never declared
    copy = other.tasks[name]
    with pytest.raises(ConfigurationError, match="option 'bulkhead' names tier 'gold'"):
        copy.apply_async(args=(1,))  # the app cannot run it: it says so when used
    mine.finalize()
    task = mine.tasks[name]
    assert task._policy().part(bulkhead.CONFIG).tier is not None
    assert task.apply(args=(21,)).get(timeout=10) == 42  # admitted through Redis, ran


def test_app_finalized_after_the_declaring_app_also_gets_a_usable_copy() -> None:
    """The same when the declaring app finalized first and the other one comes later."""
    name = f"shared.late.{secrets.token_hex(3)}"
    mine = make_app("mine", reliable_circuit_breakers={"partner": {}})
    declare(mine, name, circuit_breaker="partner")
    mine.finalize()
    other = make_app("other")
    other.finalize()
    assert mine.tasks[name]._policy().part(breaker.CONFIG).breaker is not None
    with pytest.raises(ConfigurationError, match="option 'circuit_breaker' names 'partner'"):
        other.tasks[name]._policy()


def test_declaring_app_with_a_bad_option_still_fails_at_bind() -> None:
    """Settings the declaring app lacks fail at its bind, shared task or not."""
    lazy = make_app("lazy")
    declare(lazy, f"shared.bad.{secrets.token_hex(3)}", bulkhead="gold")
    with pytest.raises(ConfigurationError, match="option 'bulkhead' names tier 'gold'"):
        lazy.finalize()
    ready = make_app("ready")
    ready.finalize()
    with pytest.raises(ConfigurationError, match="option 'bulkhead' names tier 'gold'"):
        declare(ready, f"shared.bad.{secrets.token_hex(3)}", bulkhead="gold")
    proxy = make_app("proxy")
    task = declare(proxy, f"shared.bad.{secrets.token_hex(3)}", bulkhead="gold")
    with pytest.raises(ConfigurationError, match="option 'bulkhead' names tier 'gold'"):
        task._get_current_object()


def test_bad_declaration_fails_in_every_app() -> None:
    """An option no app could accept (not a matter of settings) fails at bind everywhere."""
    name = f"shared.typo.{secrets.token_hex(3)}"
    mine = make_app("mine")
    declare(mine, name, lock="job:{missing}")
    other = make_app("other")
    with pytest.raises(ConfigurationError, match="names argument 'missing'"):
        other.finalize()


def test_two_apps_with_different_settings_get_their_own_policy() -> None:
    """One task in two apps: each app's tier, not whichever app bound last."""
    name = f"shared.tiers.{secrets.token_hex(3)}"
    small = make_app("small", reliable_bulkheads={"t": dict(TIER, concurrent=2)})
    large = make_app("large", reliable_bulkheads={"t": dict(TIER, concurrent=5)})
    declare(small, name, bulkhead="t")
    small.finalize()
    large.finalize()
    assert small.tasks[name]._policy().part(bulkhead.CONFIG).tier.concurrent == 2
    assert large.tasks[name]._policy().part(bulkhead.CONFIG).tier.concurrent == 5

    class Job(ReliableTask):  # one class registered with both apps
        name = f"shared.class.{secrets.token_hex(3)}"
        bulkhead = "t"

        def run(self, n: int) -> int:
            return n

    small.register_task(Job)
    large.register_task(Job)
    assert Job.policy_for(small).part(bulkhead.CONFIG).tier.concurrent == 2
    assert Job.policy_for(large).part(bulkhead.CONFIG).tier.concurrent == 5


def test_shared_task_decorator_fits_an_app_already_finalized(redis_url: str) -> None:
    """@shared_task reaching a finalized app that cannot run it: no error at import, only on use."""
    plain = make_app("plain")
    plain.finalize()  # like pytest-celery's module-level app, finalized before tasks import
    name = f"shared.deco.{secrets.token_hex(3)}"

    def job(self: Any, n: int) -> int:
        return n * 2

    # used to raise ConfigurationError here, when the user's tasks module was imported
    shared_task(base=ReliableTask, bind=True, name=name, bulkhead="gold")(job)
    with pytest.raises(ConfigurationError, match="option 'bulkhead' names tier 'gold'"):
        plain.tasks[name].apply_async(args=(1,))
    mine = make_app("mine", redis_url, reliable_bulkheads={"gold": TIER})
    mine.finalize()
    assert mine.tasks[name].apply(args=(21,)).get(timeout=10) == 42
    with pytest.raises(ConfigurationError, match="lock_ttl"):  # its own options: no app could
        shared_task(base=ReliableTask, bind=True, name=f"{name}.bad", lock="x", lock_ttl=-1)(job)


# ------------------------------------------------- @shared_task and the current app
#
# Which app is current is process-wide state: each of these runs in a fresh
# interpreter, where no app of the test session exists.

_ROOT = Path(__file__).resolve().parent.parent


def run_clean(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (no app of the test session is finalized there)."""
    env = {**os.environ, "PYTHONPATH": str(_ROOT)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


_PROJ = """
    import logging
    from celery import Celery, shared_task
    from celery_reliable import ConfigurationError, ReliableTask
    from celery_reliable.guards import bulkhead
    logging.basicConfig(level=logging.WARNING, format="LOG %(levelname)s %(message)s")
    GOLD = {"gold": {"concurrent": 2, "queue": 4, "timeout": 30}}
    def make(main, **conf):
        app = Celery(main, broker="memory://", backend="cache+memory://")
        app.conf.update(reliable_redis_url="redis://127.0.0.1:1/0",
                        reliable_idempotency_store="redis", **conf)
        return app
"""


def test_shared_task_with_a_bad_option_fails_when_its_app_finalizes() -> None:
    """``@shared_task`` with a tier its (current) app lacks: that app's finalize raises.

    ``celery.shared_task`` (the usual way in Django projects) belongs to the app
    current when it is declared; a setting that app lacks is bad configuration
    of the project and fails at bind (import, worker start), not at send or run.
    """
    done = run_clean(_PROJ + """
    proj = make("proj")
    @shared_task(base=ReliableTask, bind=True, bulkhead="no-such-tier")
    def job(self, n):
        return n
    try:
        proj.finalize()
    except ConfigurationError as exc:
        print("raised at bind:", exc)
    else:
        print("finalized without error")
    """)
    assert done.returncode == 0, done.stderr
    assert "raised at bind:" in done.stdout, done.stdout + done.stderr
    assert "option 'bulkhead' names tier 'no-such-tier'" in done.stdout


def test_shared_task_declaration_is_not_broken_by_another_finalized_app() -> None:
    """A finalized app without tier "gold" does not make ``@shared_task(bulkhead="gold")`` raise.

    ``shared_task`` binds the new task into every app already finalized, from its
    decorator; such an app (a test app, a second broker's app) only receives a
    copy: one WARNING at bind, the error raised if it sends the task. The current
    app, which the task belongs to, has the tier and runs it.
    """
    done = run_clean(_PROJ + """
    other = make("other")
    other.finalize()  # e.g. a test app, or a second broker's app, already in use
    proj = make("proj", reliable_bulkheads=GOLD)
    try:
        @shared_task(base=ReliableTask, bind=True, name="proj.job", bulkhead="gold")
        def job(self, n):
            return n
    except ConfigurationError as exc:
        print("declaration raised:", exc)
    else:
        proj.finalize()
        tier = proj.tasks[job.name]._policy().part(bulkhead.CONFIG).tier
        print("declared and finalized, tier:", tier.concurrent)
        try:
            other.tasks[job.name].apply_async(args=(1,))
        except ConfigurationError as exc:
            print("other raised on send:", exc)
    """)
    assert done.returncode == 0, done.stderr
    assert "declared and finalized, tier: 2" in done.stdout, done.stdout + done.stderr
    assert "other raised on send: " in done.stdout, done.stdout + done.stderr
    warnings = [line for line in done.stderr.splitlines() if "does not fit app" in line]
    assert len(warnings) == 1 and "'other'" in warnings[0], done.stderr


def test_app_made_current_after_the_declaring_app_finalized_only_gets_a_copy() -> None:
    """A second ``Celery()`` (current by default) made after the project's app got the task.

    The shared task stays the project's: the new app's finalize does not fail
    over a tier it was never given.
    """
    done = run_clean(_PROJ + """
    proj = make("proj", reliable_bulkheads=GOLD)
    @shared_task(base=ReliableTask, bind=True, name="proj.job", bulkhead="gold")
    def job(self, n):
        return n
    proj.finalize()
    other = make("other")  # set_as_current: job.delay() now resolves to it
    other.finalize()
    print("both finalized")
    try:
        job.apply_async(args=(1,))
    except ConfigurationError as exc:
        print("other raised on send:", exc)
    """)
    assert done.returncode == 0, done.stderr
    assert "both finalized" in done.stdout, done.stdout + done.stderr
    assert "other raised on send: " in done.stdout, done.stdout + done.stderr


def test_current_app_finalized_before_the_declaration_only_gets_a_copy() -> None:
    """pytest-celery's shape: the current app was finalized before the tasks module is imported.

    That app was configured without the task: it receives a copy (no error at
    import); an option no app could accept still fails there, at the declaration.
    """
    done = run_clean(_PROJ + """
    template = make("celery_test_app")
    template.finalize()
    @shared_task(base=ReliableTask, bind=True, name="proj.job", bulkhead="gold")
    def job(self, n):
        return n
    print("declared")
    try:
        @shared_task(base=ReliableTask, bind=True, lock="job:{missing}")
        def bad(self, n):
            return n
    except ConfigurationError as exc:
        print("own option raised at declaration:", exc)
    """)
    assert done.returncode == 0, done.stderr
    assert "declared" in done.stdout, done.stdout + done.stderr
    assert "own option raised at declaration:" in done.stdout, done.stdout + done.stderr
    assert "names argument 'missing'" in done.stdout


_SESSION_APP = """
    # celery.contrib.pytest: celery_session_app, then celery_session_worker
    test_app = Celery("celery.tests", set_as_current=False, broker="memory://",
                      backend="cache+memory://")
    test_app.conf.update(reliable_redis_url="redis://127.0.0.1:1/0",
                         reliable_idempotency_store="redis")
    test_app.set_default()
    test_app.set_current()
    try:
        test_app.finalize()
    except ConfigurationError as exc:
        print("test app raised at bind:", exc)
    else:
        print("test app finalized")
    try:
        test_app.tasks["proj.job"].apply_async(args=(1,))
    except ConfigurationError as exc:
        print("test app raised on send:", exc)
"""


def test_celery_pytest_session_app_only_gets_a_copy_of_the_project_shared_tasks() -> None:
    """Celery's own pytest session app, made current by hand, only receives a shared task's copy.

    The usual order in a test run: the project's app (current) and its tasks
    module are imported at collection; then ``celery_session_app`` builds
    ``TestApp(set_as_current=False)``, calls ``set_default()``/``set_current()``
    and ``celery_session_worker`` finalizes it. The shared task is first bound
    in that finalize, with the test app current: it used to count as declared
    there, so its bulkhead tier, which only the project's app configures,
    raised ConfigurationError at fixture setup. An app built with
    ``set_as_current=False`` never declares: the test app gets a copy (raising
    if it sends the task), the project's app runs it.
    """
    done = run_clean(_PROJ + """
    proj = make("proj", reliable_bulkheads=GOLD)
    @shared_task(base=ReliableTask, bind=True, name="proj.job", bulkhead="gold")
    def job(self, n):
        return n
    """ + _SESSION_APP + """
    proj.finalize()
    print("proj tier:", proj.tasks["proj.job"]._policy().part(bulkhead.CONFIG).tier.concurrent)
    """)
    assert done.returncode == 0, done.stderr
    assert "proj tier: 2" in done.stdout, done.stdout + done.stderr
    assert "test app finalized" in done.stdout, done.stdout + done.stderr
    assert "test app raised on send: " in done.stdout, done.stdout + done.stderr


def test_project_app_current_again_after_the_session_app_still_declares() -> None:
    """The session app's bind records no declarer: the project's app, current again, declares.

    So a tier the project's app lacks still fails at its bind (worker start),
    as for any ``@shared_task`` of the current app.
    """
    done = run_clean(_PROJ + """
    proj = make("proj")  # no tier "gold": bad configuration of the project
    @shared_task(base=ReliableTask, bind=True, name="proj.job", bulkhead="gold")
    def job(self, n):
        return n
    """ + _SESSION_APP + """
    proj.set_current()
    try:
        proj.finalize()
    except ConfigurationError as exc:
        print("proj raised at bind:", exc)
    """)
    assert done.returncode == 0, done.stderr
    assert "test app finalized" in done.stdout, done.stdout + done.stderr
    assert "proj raised at bind: " in done.stdout, done.stdout + done.stderr
    assert "option 'bulkhead' names tier 'gold'" in done.stdout
