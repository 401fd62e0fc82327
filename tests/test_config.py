"""Options are validated when the task is bound, with messages naming task and option."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from celery import Celery

from celery_reliable import ConfigurationError, ReliableTask
from celery_reliable.pipeline.arguments import arguments


def bind(app: Celery, name: str = "shop.charge", **options: Any) -> Any:
    def charge(self: Any, order_id: int, amount: int = 0) -> int:
        return order_id

    task = app.task(base=ReliableTask, bind=True, name=name, shared=False, **options)(charge)
    return task._get_current_object()  # evaluating the proxy binds the task


@pytest.fixture
def app() -> Celery:
    return Celery("cfg", broker="memory://", set_as_current=False)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"lock": "order:{customer}"}, "names argument 'customer', which the task does not take"),
        ({"lock": "order:{}"}, "positional field"),
        ({"lock": "order:{"}, "not a valid format template"),
        ({"lock": 7}, "non-empty template string or a callable"),
        ({"lock": "o:{order_id}", "lock_ttl": -1}, "'lock_ttl' must be > 0 seconds"),
        ({"lock": "o:{order_id}", "lock_ttl": 0}, "'lock_ttl' must be > 0 seconds"),
        ({"lock": "o:{order_id}", "lock_ttl": "30"}, "'lock_ttl' must be seconds"),
        ({"lock": "o:{order_id}", "lock_ttl": True}, "'lock_ttl' must be seconds"),
        ({"lock": "o:{order_id}", "lock_ttl": float("nan")}, "finite"),
        ({"lock": "o:{order_id}", "lock_contention": "wait"}, "'lock_contention' must be one of"),
        ({"lock_tll": 30}, "unknown reliability option 'lock_tll'; did you mean 'lock_ttl'?"),
        ({"lock_timeout": 30}, "unknown reliability option 'lock_timeout'"),
        ({"defer_delay": 5, "defer_max_delay": 1}, "'defer_max_delay' (1.0) must be >="),
    ],
)
def test_bad_option_fails_at_bind_naming_task_and_option(
    app: Celery, options: dict[str, Any], fragment: str
) -> None:
    """Each bad option raises ConfigurationError when bound, naming the task."""
    with pytest.raises(ConfigurationError) as info:
        bind(app, **options)
    assert str(info.value).startswith("shop.charge: ")
    assert fragment in str(info.value)


def test_good_options_are_normalised(app: Celery) -> None:
    """timedelta and ints become float seconds; a template over a defaulted arg is fine."""
    task = bind(app, lock="order:{order_id}:{amount}", lock_ttl=timedelta(minutes=2))
    policy = task._policy()
    assert policy.lock is not None and policy.lock.ttl == 120.0
    assert policy.lock.contention == "defer"
    assert policy.lock.resource("shop.charge", {"order_id": 7, "amount": 3}) == "order:7:3"


def test_callable_lock_receives_bound_arguments(app: Celery) -> None:
    """A callable lock gets the bound arguments as one mapping."""
    task = bind(app, lock=lambda a: f"order:{a['order_id']}")
    policy = task._policy()
    assert policy.lock.resource("shop.charge", {"order_id": 9, "amount": 0}) == "order:9"


def test_callable_lock_returning_non_string_is_named(app: Celery) -> None:
    task = bind(app, lock=lambda a: None)
    with pytest.raises(ConfigurationError, match=r"shop.charge: option 'lock' callable returned"):
        task._policy().lock.resource("shop.charge", {"order_id": 1})


def test_bad_setting_fails_at_bind(app: Celery) -> None:
    """A bad reliable_* setting is refused as soon as a task binds."""
    app.conf.reliable_key_prefix = "has space"
    with pytest.raises(ConfigurationError, match="'reliable_key_prefix'"):
        bind(app, lock="o:{order_id}")


def test_var_kwargs_task_accepts_any_template_field(app: Celery) -> None:
    def flexible(self: Any, **kwargs: Any) -> None:
        return None

    task = app.task(base=ReliableTask, bind=True, shared=False, name="flex", lock="t:{tenant}")(
        flexible
    )
    assert task.name == "flex"


def test_unbound_function_signature_is_used(app: Celery) -> None:
    """bind=False tasks are checked against their own parameters (no self)."""

    def plain(order_id: int) -> int:
        return order_id

    with pytest.raises(ConfigurationError, match="its arguments: order_id"):
        app.task(base=ReliableTask, shared=False, name="plain", lock="x:{self}")(
            plain
        )._get_current_object()


def test_methods_with_our_prefixes_are_not_options(app: Celery) -> None:
    """A class-based task may define helpers named lock_*; only values are options."""

    class Job(ReliableTask):
        name = "job"
        lock = "job:{n}"

        def lock_helper(self) -> str:
            return "fine"

        def run(self, n: int) -> int:
            return n

    app.register_task(Job())
    assert Job._build_reliable_policy(app).lock is not None


def test_every_option_is_a_documented_class_attribute() -> None:
    """Each registered option is a ReliableTask attribute defaulting to the registry's value."""
    from celery_reliable.config import SETTINGS, TASK_OPTIONS

    for name, option in TASK_OPTIONS.items():
        assert getattr(ReliableTask, name) == option.default, name
        assert option.doc and option.unit, name
    for name, option in SETTINGS.items():
        assert name.startswith("reliable_") and option.doc and option.unit, name


def test_guards_declare_their_options_once_and_settings_fill_every_field() -> None:
    """The registry is composed from each guard's OptionSet: a name declared by two guards
    is refused; every ReliableSettings field <x> is the setting reliable_<x>, and every
    setting, field or not (a guard's own: window's), is read by ``value``."""
    import dataclasses

    from celery_reliable.config import OPTION_SETS, SETTINGS, TASK_OPTIONS, ReliableSettings
    from celery_reliable.guards import lock, window
    from celery_reliable.options import collect

    declared = [o.name for s in OPTION_SETS for o in s.options]
    assert sorted(declared) == sorted(TASK_OPTIONS)
    assert "lock_ttl" in {o.name for o in lock.CONFIG.options}
    with pytest.raises(ValueError, match="'lock' is declared twice"):
        collect(lock.CONFIG.options + lock.CONFIG.options[:1])
    fields = {f.name for f in dataclasses.fields(ReliableSettings)} - {"values"}
    assert fields <= {name.removeprefix("reliable_") for name in SETTINGS}
    settings = ReliableSettings.from_conf({"reliable_bulkheads": {"bulk": {"concurrent": 2}},
                                           "reliable_queue_window_limits": {"q": "5/m"}})
    assert settings.bulkheads["bulk"].concurrent == 2
    assert settings.idempotency_store == "postgres" and settings.key_prefix == "reliable"
    assert set(settings.values) == set(SETTINGS)
    for name, option in SETTINGS.items():
        if name.removeprefix("reliable_") in fields and name != "reliable_redelivery_window":
            assert settings.value(option) == getattr(settings, name.removeprefix("reliable_"))
    assert settings.value(window.QUEUE_LIMITS) == {"q": window.WindowSpec(5, 60.0)}
    assert ReliableSettings.from_conf({}).value(window.QUEUE_LIMITS) == {}


def test_readme_reference_matches_the_code() -> None:
    """The README's option tables are generated from the registry; regenerate on change."""
    from pathlib import Path

    from celery_reliable import docs

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text("utf-8")
    assert docs.replace_in(readme) == readme, (
        "run: python -m celery_reliable.docs --write README.md"
    )


def _three_args(app: Celery, name: str) -> Any:
    def charge(self: Any, order_id: int, amount: int = 0, note: str | None = None) -> int:
        return order_id

    task = app.task(base=ReliableTask, bind=True, name=name, shared=False, lock="o:{order_id}")
    return task(charge)._get_current_object()


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((), {}),
        ((1,), {}),
        ((1, 2), {}),
        ((1,), {"note": "x"}),
        ((), {"order_id": 3, "amount": 4}),
        ((1, 2, "n"), {}),
        ((), {"note": "x", "amount": 2, "order_id": 1}),
    ],
)
def test_bound_arguments_match_inspect(app: Celery, args: Any, kwargs: Any) -> None:
    """The fast argument binding gives exactly what Signature.bind_partial + defaults give."""

    task = _three_args(app, "shop.args")
    policy = task._policy()
    expected = policy.signature.bind_partial(*args, **kwargs)
    expected.apply_defaults()
    got = arguments(policy, args, kwargs)
    assert list(got.items()) == list(expected.arguments.items())  # same values, same order


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((1,), {"order_id": 1}), ((1,), {"customer": 2}), ((1, 2, 3, 4), {})],
)
def test_bad_arguments_raise_like_inspect(app: Celery, args: Any, kwargs: Any) -> None:
    """Twice-given, unknown or too many arguments raise the TypeError inspect raises."""

    task = _three_args(app, "shop.bad")
    with pytest.raises(TypeError):
        arguments(task._policy(), args, kwargs)
