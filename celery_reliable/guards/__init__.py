"""The guards, one unit each, and the composition of their Lua fragments into the scripts.

A guard is a letter in an admission plan (``Plan.kinds``) and a Lua fragment,
``celery_reliable/guards/<name>.lua``, holding that guard's part of each script it
takes part in, one section per part, each opened by a line ``--@ <section>``:

================  =============  =========================================================
section           script         what it does
================  =============  =========================================================
``admit.check``   ``admit``      reads only (but for the bookkeeping its header lists);
                                 refuses with a ``return``, or leaves what it read in
                                 ``seen[g]`` for its apply
``admit.apply``   ``admit``      runs once every guard's check admitted; appends its
                                 result to ``out``
``complete``      ``complete``   settles what admission took; sets ``out[g]``
``rollback``      ``rollback``   undoes a lost admission's entry ``key`` of ``owner``;
                                 sets ``removed``
``renew``         ``renew``      extends the lease ``KEYS[g]`` of value ``ARGV[ai]`` by
                                 ``ARGV[ai + 1]`` ms; sets ``out[g]``
================  =============  =========================================================

The fragment's header comment documents, per script, its KEYS, ARGV, result and
refusals. Code that guards share lives once, in a shared fragment (a name that
starts with ``_``, not a guard: ``_zset_lease.lua``, a lease held as a sorted set's
member, the rollback and renewal of bulkhead slots and breaker probes), in
sections of the same form; a guard's section pulls in the shared fragment's
section of the same name with a line ``--@include <name>`` (indented as the
line is). The scripts themselves (``celery_reliable/lua/{admit,complete,rollback,
renew}.lua``) are frames: the loop over the plan, what every guard shares (the
rollback marker, the server clock), and one line ``--@guards <section>`` where the
dispatch on the guard's letter goes. :func:`compose` replaces that line with an
``if kind == 'I' then ... elseif ...`` chain of the registered guards' sections, each
followed by the advance past the guard's keys and arguments (``ki``, ``ai``) where the
script lays them out one guard after another (admission and completion; rollback
and renewal take one key per entry). The composed text is built once per process, at
the first use of a script (``scripts.script``); admission stays ONE round trip.

Each guard's Python side is ``celery_reliable/guards/<name>.py``: its :class:`Guard`
(letter, fragment, layout) and what it puts in an admission plan and a release (its
``plan`` and ``release`` functions, through the generic ``Plan.add`` and ``Release.add``;
callers outside the pipeline use them too), and at its top its task options, app
settings and part of a task's policy (``CONFIG``, an ``options.OptionSet``). Adding a
guard: its module, its fragment file, one line in :data:`GUARDS` (and its name in the
import below), and one line in ``config.OPTION_SETS`` (which composes the options
reference: regenerate it with ``python -m celery_reliable.docs --write README.md``);
its policy part is ``policy.part(CONFIG)``, its settings ``settings.value(OPTION)``.
Its metrics are ``METRICS`` in its module (``metrics.MetricSpec`` entries; none if
absent), exported by ``celery_reliable.prometheus`` through :func:`metric_specs`.
``tests/test_config_registry.py`` adds a toy guard so and runs it.
``python -m celery_reliable.guards admit`` prints a composed script.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import import_module, resources

from ..metrics import MetricSpec
from . import breaker, bucket, bulkhead, deliveries, idempotency, lock, window
from .base import Guard

__all__ = ["COMPOSED", "GUARDS", "SECTIONS", "Guard", "compose", "fragment", "metric_specs",
           "sections"]


#: Every guard, in dispatch order. One line per guard.
GUARDS: tuple[Guard, ...] = (
    idempotency.GUARD,
    lock.GUARD,
    bulkhead.GUARD,
    deliveries.GUARD,
    breaker.GUARD,
    bucket.GUARD,
    window.GUARD,
)

#: Section -> the layout (``Guard`` field) its script steps through, or None where the
#: frame indexes by entry (one key per entry).
SECTIONS: dict[str, str | None] = {
    "admit.check": "admit",
    "admit.apply": "admit",
    "complete": "complete",
    "rollback": None,
    "renew": None,
}

#: The scripts that are frames to compose (``celery_reliable/lua/<name>.lua``).
COMPOSED = frozenset({"admit", "complete", "rollback", "renew"})

_SECTION = re.compile(r"^--@ (\S+)[ \t]*$")
_INCLUDE = re.compile(r"^([ \t]*)--@include (_\w+)[ \t]*$")
_DIRECTIVE = re.compile(r"^([ \t]*)--@guards (\S+)(?: (.+))?$")


def _text(name: str) -> str:
    return resources.files("celery_reliable.guards").joinpath(f"{name}.lua").read_text("utf-8")


def fragment(guard: Guard) -> str:
    """The text of ``guard``'s fragment file, ``celery_reliable/guards/<name>.lua``."""
    return _text(guard.name)


def sections(guard: Guard) -> dict[str, list[str]]:
    """``guard``'s sections: name -> its lines (the header comment before the first is not
    code), each ``--@include`` line replaced by the shared fragment's section."""
    return _sections(guard.name)


@cache
def _sections(name: str, including: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """The sections of ``celery_reliable/guards/<name>.lua``, includes resolved."""
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in _text(name).splitlines():
        match = _SECTION.match(line)
        if match:
            section = match.group(1)
            if section not in SECTIONS:
                raise ValueError(f"guards/{name}.lua: unknown section {section!r}")
            if section in out:
                raise ValueError(f"guards/{name}.lua: section {section!r} twice")
            current = out[section] = []
        elif current is not None:
            current += _include(name, including, list(out)[-1], line)
    for lines in out.values():
        while lines and not lines[-1].strip():
            lines.pop()
    return out


def _include(name: str, including: tuple[str, ...], section: str, line: str) -> list[str]:
    """``line`` of ``name``'s ``section``, or what its ``--@include`` pulls in."""
    match = _INCLUDE.match(line)
    if match is None:
        if line.lstrip().startswith("--@include"):
            raise ValueError(f"guards/{name}.lua: bad include {line.strip()!r} (a shared "
                             "fragment's name starts with '_')")
        return [line]
    indent, shared = match.groups()
    if shared in including or shared == name:
        raise ValueError(f"guards/{name}.lua: {shared}.lua includes itself")
    body = _sections(shared, (*including, name)).get(section)
    if body is None:
        raise ValueError(f"guards/{name}.lua: {shared}.lua has no section {section!r}")
    return [f"{indent}{x}" if x.strip() else "" for x in body]


def _advance(keys: int, args: int) -> str:
    if args:
        return f"ki, ai = ki + {keys}, ai + {args}"
    return f"ki = ki + {keys}"


def _dispatch(section: str, indent: str, unknown: str | None) -> list[str]:
    """The ``if kind == ...`` chain of every guard with ``section`` (or its script's layout)."""
    layout = SECTIONS[section]
    out: list[str] = []
    for guard in GUARDS:
        body = sections(guard).get(section)
        step = getattr(guard, layout) if layout is not None else (0, 0)
        if body is None and step == (0, 0):
            continue  # not in this script: its letter is unknown there
        out.append(f"{indent}{'elseif' if out else 'if'} kind == '{guard.letter}' then")
        out += [f"{indent}  {line}" if line.strip() else "" for line in body or ()]
        if step != (0, 0):
            out.append(f"{indent}  {_advance(*step)}")
    if unknown is not None:
        out += [f"{indent}else", f"{indent}  return redis.error_reply({unknown} .. kind)"]
    if out:
        out.append(f"{indent}end")
    return out


def compose(frame: str) -> str:
    """``frame`` with each ``--@guards <section> [<lua string>]`` line made the dispatch.

    The optional Lua string is the error reply's prefix for a letter no guard
    handles in that section (followed by the letter); without it such a letter
    is skipped (admission's apply: its check already refused it).
    """
    lines: list[str] = []
    for line in frame.splitlines():
        match = _DIRECTIVE.match(line)
        if match is None:
            lines.append(line)
            continue
        indent, section, unknown = match.groups()
        if section not in SECTIONS:
            raise ValueError(f"unknown guard section {section!r} in {line.strip()!r}")
        lines += _dispatch(section, indent, unknown)
    return "\n".join(lines) + "\n"


def metric_specs() -> tuple[MetricSpec, ...]:
    """Every guard's ``METRICS`` (its module ``celery_reliable.guards.<name>``), in
    :data:`GUARDS` order; a guard module without ``METRICS`` has none."""
    return tuple(spec for guard in GUARDS
                 for spec in getattr(import_module(f"{__name__}.{guard.name}"), "METRICS", ()))


def _check_registry() -> None:
    letters = [g.letter for g in GUARDS]
    if len(set(letters)) != len(letters) or not all(
        len(x) == 1 and x.isalpha() and x.isupper() for x in letters
    ):
        raise ValueError(f"guard letters must be unique capital letters: {letters}")


_check_registry()
