"""pytest plugin: ``s3_server``, one real S3-compatible server (SeaweedFS) per test session.

Register it with ``pytest_plugins = ["tests.s3fixture"]``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.s3server import S3Server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A started :class:`s3server.S3Server`; make a bucket per test with ``s3_server.bucket(name)``."""
    with S3Server() as server:
        yield server
