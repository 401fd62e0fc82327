"""Lua scripts shipped as package data, registered once per client, run by SHA."""

from __future__ import annotations

import hashlib
from functools import cache
from importlib import resources
from typing import Any

import redis

__all__ = ["Script", "script"]


class Script:
    """One Lua script: EVALSHA, with a single SCRIPT LOAD if the server lost it."""

    __slots__ = ("name", "sha", "source")

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode("utf-8")).hexdigest()

    def __call__(self, client: redis.Redis, keys: list[str], args: list[Any]) -> Any:
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            client.script_load(self.source)
            return client.evalsha(self.sha, len(keys), *keys, *args)


@cache
def script(name: str) -> Script:
    """The packaged script ``celery_reliable/lua/<name>.lua``."""
    source = resources.files("celery_reliable").joinpath(f"lua/{name}.lua").read_text("utf-8")
    return Script(name, source)
