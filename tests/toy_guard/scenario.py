"""Run in a subprocess by tests/test_config_registry.py, on a copy of the package that
has the toy guard (``toy.py``, ``toy.lua``) and its registry lines, nothing else.

Prints one JSON object: what the toy guard did through the real pipeline.
"""

from __future__ import annotations

import json
import secrets
import sys
from typing import Any

package_root, redis_url, prefix = sys.argv[1:4]
sys.path.insert(0, package_root)

import redis  # noqa: E402
from celery import Celery  # noqa: E402
from celery.exceptions import Retry  # noqa: E402

import celery_reliable  # noqa: E402
from celery_reliable import ConfigurationError, ReliableTask, docs  # noqa: E402
from celery_reliable.guards import toy  # noqa: E402
from celery_reliable.keys import KeySpace  # noqa: E402
from celery_reliable.task import Deferred  # noqa: E402

out: dict[str, Any] = {"package": celery_reliable.__file__}
app = Celery("toy", broker="memory://", set_as_current=False)
app.conf.reliable_redis_url = redis_url
app.conf.reliable_key_prefix = prefix
app.conf.reliable_toy_retry = 7


def deliver(task: Any) -> Any:
    """Run ``task`` as a worker would for one delivery; returns the outcome."""
    task.push_request(id=secrets.token_hex(8), args=[], kwargs={}, called_directly=False,
                      is_eager=False, retries=0,
                      delivery_info={"exchange": "", "routing_key": "q"}, headers={})
    try:
        return task()
    except Retry as retry:
        return retry
    finally:
        task.pop_request()


@app.task(base=ReliableTask, bind=True, shared=False, name="toy.gated", toy_gate="g1")
def gated(self: Any) -> str:
    return "ran"


@app.task(base=ReliableTask, bind=True, shared=False, name="toy.plain")
def plain(self: Any) -> str:
    return "plain"


client = redis.Redis.from_url(redis_url)
key = toy.gate_key(KeySpace(prefix).tag, "g1")
policy = gated._policy()
out["part"] = policy.part(toy.CONFIG)
out["guarded"] = policy.guarded
out["plain_guarded"] = plain._policy().guarded
out["attribute"] = ReliableTask.toy_gate
reference = docs.reference()
out["in_reference"] = "`toy_gate`" in reference and "`reliable_toy_retry`" in reference
out["first"] = deliver(gated)
out["passed"] = int(client.hget(key, "passed") or 0)
client.hset(key, "closed", "1")
refused = deliver(gated)
out["refused_deferred"] = isinstance(refused, Deferred)
out["refused_when"] = float(refused.when) if isinstance(refused, Deferred) else None
out["passed_after_refusal"] = int(client.hget(key, "passed") or 0)
out["plain"] = deliver(plain)
client.delete(key)


def bad_task(self: Any) -> None:
    return None


for n, bad in enumerate(({"toy_gatr": "x"}, {"toy_gate": ""})):
    try:
        app.task(base=ReliableTask, bind=True, shared=False, name=f"toy.bad{n}",
                 **bad)(bad_task)._get_current_object()
        out[f"bad {bad}"] = None
    except ConfigurationError as exc:
        out[f"bad {bad}"] = str(exc).split(" (known options")[0]
print(json.dumps(out))
