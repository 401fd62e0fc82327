"""Of several wrong options, the error names the first in the options reference's order.

The reference (README, ``python -m celery_reliable.docs``) lists options in
``config.OPTION_SETS`` order, guard by guard; validation goes the same way: a
guard's values, then its templates, then their combination, before the next
guard's. An unknown option (a typo) is refused before any value is looked at.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from celery_reliable import ConfigurationError, ReliableTask
from celery_reliable.config import OPTION_SETS, SETTINGS, TASK_OPTIONS, ReliableSettings

README = Path(__file__).resolve().parent.parent / "README.md"


def bind(app: Celery, **options: Any) -> Any:
    def charge(self: Any, order_id: int, amount: int = 0) -> int:
        return order_id

    task = app.task(base=ReliableTask, bind=True, name="shop.charge", shared=False,
                    **options)(charge)
    return task._get_current_object()  # evaluating the proxy binds the task


@pytest.fixture
def app() -> Celery:
    return Celery("cfg", broker="memory://", set_as_current=False)


def test_reference_order_is_the_registry_order() -> None:
    """The README's tables list the options guard by guard, in OPTION_SETS order."""
    text = README.read_text("utf-8")
    rows = [line.split("`")[1] for line in text.splitlines() if line.startswith("| `")]
    assert [r for r in rows if r in TASK_OPTIONS] == [
        o.name for s in OPTION_SETS for o in s.options]
    assert [r for r in rows if r in SETTINGS] == list(SETTINGS)
    assert list(TASK_OPTIONS) == [o.name for s in OPTION_SETS for o in s.options]


@pytest.mark.parametrize(
    ("options", "named", "not_named"),
    [
        # two bad values: lock's guard comes before idempotency's
        ({"lock": "o:{order_id}", "lock_ttl": -1, "idempotency_ttl": -1},
         "'lock_ttl' must be > 0", "idempotency_ttl"),
        # the same two given in the other order: the reference's order still decides
        ({"idempotency_ttl": -1, "lock": "o:{order_id}", "lock_ttl": -1},
         "'lock_ttl' must be > 0", "idempotency_ttl"),
        # a template naming a missing argument (lock) before a later guard's bad value
        ({"lock": "o:{customer}", "idempotency_ttl": -1},
         "names argument 'customer'", "idempotency_ttl"),
        # a bad combination (window's key without its limit) before a later guard's value
        ({"rate_limit_window_key": "t:{order_id}", "defer_delay": -1},
         "'rate_limit_window_key' is set but 'rate_limit_window' is not", "defer_delay"),
        # an earlier guard's bad value before a later guard's bad combination
        ({"rate_cost": -1, "rate_limit_window_key": "t:{order_id}"},
         "'rate_cost'", "rate_limit_window"),
        # within one guard: its values before their combination
        ({"defer_delay": 5, "defer_max_delay": -1}, "'defer_max_delay' must be > 0",
         "must be >= 'defer_delay'"),
        # a typo is refused before any value is looked at
        ({"lock_ttl": -1, "idempotency_tll": 5},
         "unknown reliability option 'idempotency_tll'", "'lock_ttl' must"),
    ],
)
def test_two_bad_options_name_the_first_in_reference_order(
    app: Celery, options: dict[str, Any], named: str, not_named: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        bind(app, **options)
    message = str(info.value)
    assert message.startswith("shop.charge: ")
    assert named in message
    assert not_named not in message.split("(known options:")[0]


@pytest.mark.parametrize(
    ("conf", "named"),
    [
        # a shared setting (listed first) before a guard's
        ({"reliable_queue_window_limits": "nope", "reliable_redis_socket_timeout": -1},
         "'reliable_redis_socket_timeout'"),
        # two guards' settings: window comes before bulkhead in the reference
        ({"reliable_bulkheads": "nope", "reliable_queue_window_limits": "nope"},
         "'reliable_queue_window_limits'"),
        ({"reliable_circuit_breakers": "nope", "reliable_bulkheads": "nope"},
         "'reliable_bulkheads'"),
        # an unknown setting (a typo) before any value
        ({"reliable_redis_socket_timeout": -1, "reliable_bulkhead": {}},
         "unknown setting 'reliable_bulkhead'"),
    ],
)
def test_two_bad_settings_name_the_first_in_reference_order(
    conf: dict[str, Any], named: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        ReliableSettings.from_conf(conf)
    message = str(info.value)
    assert message.startswith("app settings: ")
    assert named in message
    others = [name for name in conf if f"'{name}'" not in named]
    head = message.split("(celery-reliable's settings:")[0]
    assert not any(f"option {name!r}" in head for name in others)
