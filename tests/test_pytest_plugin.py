"""The pytest plugin (celery_reliable.contrib.pytest), run on a user's test suite (pytester)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa

from .conftest import RedisServer, free_port

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = "celery_reliable.contrib.pytest"

#: A user's tasks: module level shared tasks, as a project declares them.
USER_TASKS = '''
import threading
from celery import shared_task
from celery_reliable import ReliableTask

RAN = []
STARTED = threading.Event()
RELEASE = threading.Event()


@shared_task(base=ReliableTask, bind=True, name="user.charge", idempotency_key="charge:{order}")
def charge(self, order):
    RAN.append(order)
    return {"order": order}


@shared_task(base=ReliableTask, bind=True, name="user.hold", lock="account:{account}")
def hold(self, account):
    STARTED.set()
    assert RELEASE.wait(30)
    return self.fence_token


@shared_task(base=ReliableTask, bind=True, name="user.fail")
def fail(self):
    raise ValueError("card declined")
'''

#: The user's tests: every fixture and helper of the plugin, one test each.
USER_TESTS = '''
import json
import pytest
from tasks import RAN, RELEASE, STARTED, charge, fail, hold

SEEN = {seen!r}


@pytest.fixture(autouse=True)
def record(request):
    yield
    guards = request.node.funcargs.get("reliable_guards")
    if guards is not None:
        with open(SEEN, "a") as f:
            f.write(json.dumps([request.node.name, guards.prefix, guards.schema]) + "\\n")


@pytest.mark.parametrize("run", ["first", "second"])
def test_a_duplicate_is_replayed(reliable_worker, reliable_guards, run):
    before = len(RAN)
    first = charge.delay(7)
    assert first.get(timeout=30) == {{"order": 7}}
    assert not reliable_guards.replayed(first)
    with pytest.raises(AssertionError, match="was not replayed"):
        reliable_guards.assert_replayed(first)
    second = charge.delay(7)
    reliable_guards.assert_replayed(second)
    assert second.get(timeout=30) == {{"order": 7}}
    assert len(RAN) == before + 1  # each test runs it once: its own prefix and schema


def test_apply_replays_without_a_worker(reliable_app, reliable_guards):
    first = charge.apply(args=(8,))
    second = charge.apply(args=(8,))
    assert first.get() == second.get() == {{"order": 8}}
    reliable_guards.assert_replayed(second)
    assert not reliable_guards.replayed(first)


def test_held_locks_shows_the_running_holder(reliable_worker, reliable_guards):
    assert reliable_guards.held_locks() == []
    result = hold.delay("acct-1")
    assert STARTED.wait(30)
    locks = reliable_guards.held_locks()
    RELEASE.set()
    assert [lock.task_id for lock in locks] == [result.id]
    assert locks[0].ttl_ms > 0
    assert result.get(timeout=30) == int(locks[0].token)
    assert reliable_guards.held_locks() == []


def test_dead_letters_of_this_test(reliable_worker, reliable_guards):
    result = fail.delay()
    with pytest.raises(ValueError):
        result.get(timeout=30)
    letters = reliable_guards.dead_letters()
    assert [(x.task_name, x.task_id, x.exc_message) for x in letters] == [
        ("user.fail", result.id, "card declined")]
'''


def _conftest(redis_url: str, database_url: str, explicit: bool) -> str:
    load = f"pytest_plugins = [{PLUGIN!r}]\n" if explicit else ""
    return (
        "import pytest\n" + load +
        "\n@pytest.fixture(scope='session')\n"
        "def celery_config():\n"
        f"    return {{'reliable_redis_url': {redis_url!r}, "
        f"'reliable_database_url': {database_url!r}}}\n"
    )


def _pytest11() -> dict[str, str]:
    """pyproject.toml's pytest11 entry points (tomllib is not in Python 3.10)."""
    text = (ROOT / "pyproject.toml").read_text()
    section = re.search(r"^\[project\.entry-points\.pytest11\]\n(.*?)(?=^\[|\Z)", text,
                        re.MULTILINE | re.DOTALL)
    assert section is not None, "no [project.entry-points.pytest11] in pyproject.toml"
    return dict(re.findall(r'^"?([\w.]+)"?\s*=\s*"([\w.:]+)"', section.group(1), re.MULTILINE))


def _entry_point_dist(path: Path) -> Path:
    """A distribution declaring the pytest11 entry point of pyproject.toml (not reinstalled)."""
    entry_points = _pytest11()
    dist = path / "site" / "celery_reliable_plugin_probe-0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: celery-reliable-plugin-probe\nVersion: 0\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (dist / "entry_points.txt").write_text(f"[pytest11]\n{lines}")
    return dist.parent


def test_entry_point_is_named_after_the_module() -> None:
    """pytest11 entry point: named after its module, so explicit pytest_plugins cannot clash."""
    assert _pytest11() == {PLUGIN: PLUGIN}


def test_user_suite_gets_isolated_guards(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    redis_server: RedisServer,
    database_url: str,
    engine: sa.Engine,
) -> None:
    """A user's suite: replays, locks and dead letters seen per test; all cleaned up after."""
    seen = pytester.path / "seen.jsonl"
    client = redis.Redis.from_url(f"{redis_server.url}/5")
    client.set("{reliable}:someone-else", "kept")  # the default prefix, outside any test's
    client.set("unrelated", "kept")
    pytester.makepyfile(tasks=USER_TASKS, test_user=USER_TESTS.format(seen=str(seen)))
    pytester.makeconftest(_conftest(f"{redis_server.url}/5", database_url, explicit=True))
    # Loaded both by the entry point and by the conftest's pytest_plugins: no clash.
    site = _entry_point_dist(pytester.path)
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}:{site}")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-v", timeout=240)
    result.assert_outcomes(passed=5)

    runs = [json.loads(line) for line in seen.read_text().splitlines()]
    assert len(runs) == 5
    prefixes = {prefix for _, prefix, _ in runs}
    schemas = {schema for _, _, schema in runs}
    assert len(prefixes) == 5 and len(schemas) == 5 and None not in schemas
    with engine.connect() as conn:
        left = conn.execute(sa.text(
            "SELECT schema_name FROM information_schema.schemata "
            "WHERE schema_name LIKE 'reliable_test_%'")).scalars().all()
        public_letters = conn.execute(sa.text(
            "SELECT count(*) FROM public.reliable_dead_letters WHERE task_name = 'user.fail'"
        )).scalar_one()
    assert not schemas & set(left), "a test's schema was not dropped"
    assert public_letters == 0  # the dead letter went into the test's own schema
    for prefix in prefixes:
        assert list(client.scan_iter(match="{" + prefix + "}:*")) == [], prefix
    assert client.get("{reliable}:someone-else") == b"kept"
    assert client.get("unrelated") == b"kept"
    client.close()


def test_plugin_is_inert_until_its_fixtures_are_used(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loaded alone (autoload off), with servers that do not exist: nothing connects."""
    dead_port = free_port()
    pytester.makeconftest(_conftest(f"redis://127.0.0.1:{dead_port}/0",
                                    f"postgresql://nobody@127.0.0.1:{dead_port}/none",
                                    explicit=False))
    pytester.makepyfile(test_plain='''
def test_plain():
    assert True

def test_celery_fixtures_are_there(celery_app):
    # the plugin registered celery.contrib.pytest: pytest-celery is not loaded here
    assert celery_app.conf.reliable_redis_url.startswith("redis://")
''')
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    result = pytester.runpytest_subprocess("-p", PLUGIN, "-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=2)


#: A project's own app, with tasks declared on it (@app.task) and a prefix of its own.
USER_APP = '''
from celery import Celery
from celery_reliable import ReliableTask

app = Celery("proj", broker="memory://", backend="cache+memory://")
app.conf.update(reliable_redis_url={redis_url!r}, reliable_database_url={database_url!r},
                reliable_key_prefix="proj")


@app.task(base=ReliableTask, bind=True, name="proj.once", idempotency_key="once:{{n}}")
def once(self, n):
    return n * 2
'''

USER_APP_TESTS = '''
import pytest
from proj import app, once


@pytest.fixture
def celery_app():
    return app


def test_own_app_isolated(reliable_worker, reliable_guards):
    assert reliable_guards.prefix.startswith("proj-t")
    assert app.conf.reliable_key_prefix == reliable_guards.prefix
    assert once.delay(1).get(timeout=30) == 2
    second = once.delay(1)
    reliable_guards.assert_replayed(second)


def test_own_app_settings_restored_afterwards():
    assert app.conf.reliable_key_prefix == "proj"
    assert app.conf.reliable_database_url == {database_url!r}
'''


def test_users_own_app_is_isolated_then_restored(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    redis_server: RedisServer,
    database_url: str,
) -> None:
    """Overriding celery_app with the project's app: isolated during a test, restored after."""
    redis_url = f"{redis_server.url}/6"
    pytester.makepyfile(proj=USER_APP.format(redis_url=redis_url, database_url=database_url),
                        test_proj=USER_APP_TESTS.format(database_url=database_url))
    pytester.makeconftest(f"pytest_plugins = [{PLUGIN!r}]\n")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=240)
    result.assert_outcomes(passed=2)
    client = redis.Redis.from_url(redis_url)
    assert list(client.scan_iter(match="{proj-t*")) == []
    client.close()
