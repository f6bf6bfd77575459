"""Stores on both kinds of storage: a local directory and a bucket of the session's real S3 server."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import pytest

from recpipe.store import Store

_names = itertools.count()


@dataclass
class Where:
    """A store location and what a subprocess needs to reach it."""

    uri: str
    options: dict[str, str] | None
    env: dict[str, str]

    def create(self) -> Store:
        return Store.create(self.uri, self.options)

    def open(self) -> Store:
        return Store(self.uri, self.options)


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path) -> Where:
    if request.param == "local":
        return Where(str(tmp_path / "store"), None, dict(os.environ))
    server = request.getfixturevalue("s3_server")
    bucket = server.bucket(f"store-{os.getpid()}-{next(_names)}")
    return Where(f"{bucket}/archive", server.storage_options(), {**os.environ, **server.env()})
