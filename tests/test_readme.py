"""The README's quickstart and guarantees table point at things that exist: section
anchors, package extras, app settings, and test files."""

from __future__ import annotations

import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from celery_reliable.config import SETTINGS

from .conftest import PG_ADMIN_URL, RedisServer

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text("utf-8")
#: The README without its fenced code blocks (a `# comment` there is not a heading).
PROSE = re.sub(r"^```.*?^```", "", README, flags=re.M | re.S)


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_section_link_has_its_section() -> None:
    """A renamed section breaks the guarantees table's links: this names the broken ones."""
    anchors = {github_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", PROSE, re.M)}
    links = set(re.findall(r"\]\(#([^)]+)\)", PROSE))
    assert links, "no section links found"
    assert not links - anchors, f"links to missing sections: {sorted(links - anchors)}"


def test_extras_named_in_the_readme_exist() -> None:
    """`pip install 'celery-reliable[x]'` names only extras pyproject.toml declares."""
    # tomllib is 3.11+: the section's keys are the lines `name = [` inside it
    pyproject = (ROOT / "pyproject.toml").read_text("utf-8")
    section = pyproject.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    extras = set(re.findall(r"^([\w-]+)\s*=", section, re.M))
    named = set(re.findall(r"celery-reliable\[(\w+)\]", README))
    assert named and not named - extras, f"unknown extras: {sorted(named - extras)}"


def test_settings_set_in_the_readme_exist() -> None:
    """Every `app.conf.reliable_* =` in the README is a registered setting."""
    named = set(re.findall(r"app\.conf\.(reliable_\w+)\s*=", README))
    assert {"reliable_redis_url", "reliable_database_url"} <= named
    assert not named - SETTINGS.keys(), f"unknown settings: {sorted(named - SETTINGS.keys())}"


def test_tests_named_in_the_guarantees_table_exist() -> None:
    """Each `test_*.py` the README cites as evidence is a file in tests/."""
    cited = set(re.findall(r"`(test_\w+\.py)`", README))
    assert cited
    missing = sorted(name for name in cited if not (ROOT / "tests" / name).exists())
    assert not missing, f"cited test files missing: {missing}"


def test_the_first_screen_is_the_two_commands_then_the_quickstart() -> None:
    """The README opens with ./scripts/demo and ./scripts/test, then the quickstart in its
    order (install, settings, migrate, a guarded task, status), then the guarantees table."""
    first_block = README.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#", 1)[0].strip() for line in first_block.splitlines()]
    assert commands == ["./scripts/demo", "./scripts/test"]
    for command in commands:
        assert (ROOT / command).stat().st_mode & 0o111, f"{command} is not executable"
    headings = re.findall(r"^## (.+)$", PROSE, re.M)
    assert headings[:2] == ["Quickstart: an existing Celery app", "What each guard guarantees"]
    quickstart = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    steps = ["pip install celery-reliable", "app.conf.reliable_redis_url =",
             "celery -A proj reliable migrate", "base=ReliableTask",
             "celery -A proj reliable status"]
    where = [quickstart.find(step) for step in steps]
    assert -1 not in where and where == sorted(where), dict(zip(steps, where, strict=True))


QUICKSTART = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]


def blocks(lang: str) -> list[str]:
    """The quickstart's fenced code blocks in ``lang``, in order."""
    return re.findall(rf"^```{lang}\n(.*?)^```", QUICKSTART, re.M | re.S)


def command(line: str) -> list[str]:
    """A quickstart shell line (comment dropped), run with this test's Python."""
    argv = shlex.split(line.split("  #", 1)[0])
    return [sys.executable, "-m", "celery", *argv[1:]] if argv[0] == "celery" else \
        [sys.executable, *argv[1:]]


@pytest.mark.slow
def test_the_quickstart_runs_as_written(redis_server: RedisServer, tmp_path: Path) -> None:
    """The quickstart's settings, task and commands, as written, on a fresh database and
    the private Redis: migrate, a worker, three sends of one charge, then status."""
    settings, task = blocks("python")
    shell = [line for block in blocks("bash") for line in block.splitlines()
             if line.startswith(("celery -A proj", "python -c"))]
    starts = ["celery -A proj reliable migrate", "celery -A proj worker",
              "python -c \"from proj import charge", "celery -A proj reliable status"]
    assert len(shell) == 4 and all(map(str.startswith, shell, starts)), shell
    name = f"reliable_qs_{secrets.token_hex(4)}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    database = admin.url.set(database=name).render_as_string(hide_password=False)
    settings = re.sub(r'(reliable_redis_url = )"[^"]*"', rf'\1"{redis_server.url}/0"', settings)
    settings = re.sub(r'(reliable_database_url = )"[^"]*"', rf'\1"{database}"', settings)
    (tmp_path / "proj.py").write_text(
        "import sqlalchemy as sa\nfrom celery import Celery\n"
        f"app = Celery('proj', broker='{redis_server.url}/3', backend='{redis_server.url}/3')\n"
        f"app.conf.update(task_default_queue='qs', reliable_key_prefix='{name}')\n"
        "payments = sa.Table('payments', sa.MetaData(), sa.Column('order_id', sa.Integer),\n"
        "                    sa.Column('amount', sa.Integer))\n" + settings + task)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "COLUMNS": "80"}
    run = {"cwd": tmp_path, "env": env, "capture_output": True, "text": True, "timeout": 120}
    log = tmp_path / "worker.log"
    worker = None
    try:
        migrate = subprocess.run(command(shell[0]), **run)
        assert migrate.returncode == 0 and "tables ready" in migrate.stdout, migrate.stderr
        with sa.create_engine(database).begin() as conn:
            conn.execute(sa.text("CREATE TABLE payments (order_id int, amount int)"))
        with log.open("wb") as out:
            worker = subprocess.Popen([*command(shell[1]), "-P", "solo", "--without-mingle",
                                       "--without-gossip"], cwd=tmp_path, env=env, stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while " ready." not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline and worker.poll() is None, log.read_text()
            time.sleep(0.1)
        send = subprocess.run(command(shell[2]), **run)
        assert send.stdout.strip() == str([{"order_id": 7, "charged": 500}] * 3), send.stderr
        with sa.create_engine(database).connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM payments")).scalar() == 1
        assert log.read_text().count("replayed the stored result (duplicate not run)") == 2
        status = subprocess.run(command(shell[3]), **run)
        assert status.returncode == 0 and "Locks held (0)" in status.stdout, status.stderr
    finally:
        if worker is not None:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(30)
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
