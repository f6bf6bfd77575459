"""Where a store lives: a local directory or ``s3://bucket/prefix``, and how to reach it.

    loc = Location.parse("s3://bucket/runs", {"AWS_ENDPOINT_URL": "http://127.0.0.1:8333"})
    loc.table_uri("rollouts")        # "s3://bucket/runs/rollouts" (what delta-rs opens)
    loc.fs, loc.path("rollouts")     # the pyarrow filesystem and the path on it (what pyarrow reads)

S3 settings come from the usual AWS environment variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ALLOW_HTTP) and may be overridden by explicit storage options.
Concurrent writers on S3 are only safe with a commit protocol that cannot lose a commit: delta-rs
writes each log entry with a conditional put (``conditional_put=etag``, the default here). Settings
that would let two writers overwrite each other's commit (``AWS_S3_ALLOW_UNSAFE_RENAME``, or
``conditional_put`` switched off) are refused.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from recpipe.errors import RecpipeError

AWS_KEYS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
            "AWS_ALLOW_HTTP", "AWS_S3_ALLOW_UNSAFE_RENAME", "AWS_S3_LOCKING_PROVIDER")
SAFE_PUT = "etag"


class LocationError(RecpipeError, ValueError):
    """The store URI or its storage settings cannot be used."""


@dataclass(frozen=True)
class Location:
    uri: str  # canonical: an absolute local path, or s3://bucket/prefix without a trailing slash
    storage_options: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, uri: str | Path, storage_options: dict[str, str] | None = None) -> Location:
        text = str(uri)
        if "://" not in text:
            return cls(str(Path(text).expanduser().resolve()), {})
        parsed = urlparse(text)
        if parsed.scheme not in ("s3", "s3a"):
            raise LocationError(f"store {text!r}: only local paths and s3://bucket/prefix are supported")
        if not parsed.netloc:
            raise LocationError(f"store {text!r}: no bucket (expected s3://bucket/prefix)")
        options = {k: v for k, v in os.environ.items() if k in AWS_KEYS}
        options.update({k.upper() if k.upper() in AWS_KEYS else k: str(v) for k, v in (storage_options or {}).items()})
        options.setdefault("conditional_put", SAFE_PUT)
        options.setdefault("AWS_REGION", "us-east-1")
        _check_safe(text, options)
        prefix = parsed.path.strip("/")
        return cls(f"s3://{parsed.netloc}" + (f"/{prefix}" if prefix else ""), options)

    @property
    def is_local(self) -> bool:
        return not self.uri.startswith("s3://")

    def table_uri(self, table: str) -> str:
        return f"{self.uri}/{table}"

    def path(self, *parts: str) -> str:
        """A path on ``fs``: the local path, or ``bucket/prefix/...`` for S3."""
        base = self.uri if self.is_local else self.uri[len("s3://"):]
        return "/".join([base, *parts])

    def commit_file(self, table: str, version: int) -> str:
        """The path on ``fs`` of commit ``version`` of ``table``: ``_delta_log/<version, 20 digits>.json``."""
        return self.path(table, "_delta_log", f"{version:020d}.json")

    @property
    def fs(self) -> pafs.FileSystem:
        return _filesystem(self.uri, tuple(sorted(self.storage_options.items())))

    def cache_dir(self) -> Path:
        """The local folder that stands for the store on this machine: the store itself when local, else a
        cache (RECPIPE_CACHE, default ~/.cache/recpipe) named after the URI, holding fetched checkpoints."""
        if self.is_local:
            return Path(self.uri)
        base = Path(os.environ.get("RECPIPE_CACHE", Path.home() / ".cache" / "recpipe"))
        name = self.uri[len("s3://"):].replace("/", "_")[:80]
        return base / f"{name}-{hashlib.sha256(self.uri.encode()).hexdigest()[:8]}"


def _check_safe(uri: str, options: dict[str, str]) -> None:
    if options.get("AWS_S3_ALLOW_UNSAFE_RENAME", "").lower() in ("1", "true", "yes"):
        raise LocationError(f"store {uri}: AWS_S3_ALLOW_UNSAFE_RENAME=true lets two writers overwrite each other's "
                            "commit; recpipe needs a safe commit protocol (conditional_put=etag); unset it")
    put = options.get("conditional_put", "").lower()
    if put != SAFE_PUT:
        raise LocationError(f"store {uri}: conditional_put={put!r} would allow lost commits with several writers; "
                            f"use conditional_put={SAFE_PUT} (an S3 server with conditional writes: AWS S3, "
                            "MinIO, SeaweedFS, R2)")


_filesystems: dict[tuple[str, tuple[tuple[str, str], ...]], pafs.FileSystem] = {}


def _filesystem(uri: str, options: tuple[tuple[str, str], ...]) -> pafs.FileSystem:
    key = (uri, options)
    if key not in _filesystems:
        if not uri.startswith("s3://"):
            _filesystems[key] = pafs.LocalFileSystem()
        else:
            opts = dict(options)
            endpoint = opts.get("AWS_ENDPOINT_URL")
            kwargs = {"region": opts.get("AWS_REGION", "us-east-1"),
                      "access_key": opts.get("AWS_ACCESS_KEY_ID"), "secret_key": opts.get("AWS_SECRET_ACCESS_KEY"),
                      "session_token": opts.get("AWS_SESSION_TOKEN")}
            if endpoint:
                parsed = urlparse(endpoint)
                kwargs.update(endpoint_override=parsed.netloc or endpoint, scheme=parsed.scheme or "https")
            _filesystems[key] = pafs.S3FileSystem(**{k: v for k, v in kwargs.items() if v is not None})
    return _filesystems[key]
