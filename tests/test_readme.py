"""The README's quickstart and guarantees table point at things that exist: section
anchors, package extras, app settings, and test files."""

from __future__ import annotations

import re
from pathlib import Path

from celery_reliable.config import SETTINGS

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
