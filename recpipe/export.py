"""A policy version as a plain Hugging Face model folder, for ``recpipe export``.

    export_version(store, "r1", 3, Path("out/r1-v3"), dtype="bfloat16")

The folder holds what ``from_pretrained`` and ``vllm serve`` read - config.json, generation_config.json,
model.safetensors, the tokenizer files and chat template - and none of the trainer's files (optimizer
state, trainer_state.json, the manifest). The version's files are checked against its manifest first,
so a damaged checkpoint is never exported; on an S3 store the version is fetched into this machine's
cache first (recpipe.train.checkpoint.local_version).
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from recpipe.errors import RecpipeError
from recpipe.status import missing_version_message, recorded_versions, require_version
from recpipe.store import Store
from recpipe.train import checkpoint as ckpt

DTYPES = ("float32", "bfloat16", "float16")


class ExportError(RecpipeError, ValueError):
    """The version cannot be exported (not there, or the target is not a place to write it)."""


def version_dir(store: Store, run: str, version: int) -> Path:
    """The local folder of a store version >= 1 (fetched from an S3 store), checked against its manifest;
    VersionMissing saying why when it is not there."""
    require_version(store, run, version)
    path = ckpt.local_version(store, run, version)
    ckpt.check_checkpoint(path, version, optimizer="skip")
    return path


def source_dir(store: Store, run: str, version: int) -> Path:
    """Where version ``version``'s weights are: its checkpoint folder, or for 0 the run's base model."""
    if version > 0:
        return version_dir(store, run, version)
    row = recorded_versions(store, run).get(0)
    if row is None:
        raise ExportError(missing_version_message(store, run, 0))
    base = ckpt.resolve_checkpoint(store, row["checkpoint"])
    if not (base / "config.json").is_file():
        raise ExportError(f"run {run!r}: version 0 is its base model {row['base_model']}, which is not on this "
                          f"machine at {base}")
    return base


def _target(to: Path, store: Store) -> Path:
    to = Path(to).expanduser().resolve()
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise ExportError(f"--to {to} exists and is not an empty folder: name a new one")
    if not to.parent.is_dir():
        raise ExportError(f"--to {to}: folder {to.parent} does not exist (create it first)")
    root = Path(store.root).resolve()
    if to == root or root in to.parents:
        raise ExportError(f"--to {to} is inside the store {store.uri}: export writes outside the archive")
    return to


def export_version(store: Store, run: str, version: int, to: Path, dtype: str | None = None) -> Path:
    """Write version ``version`` of ``run`` to the new folder ``to`` (atomically: a failure leaves nothing),
    weights in ``dtype`` (default: as stored, float32). Returns the folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    to = _target(to, store)
    src = source_dir(store, run, version)
    tmp = to.with_name(f".{to.name}.export-{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype or "float32"))
        model.save_pretrained(tmp)  # config.json (with its dtype), model.safetensors, generation_config.json
        if (src / "generation_config.json").is_file() and not (tmp / "generation_config.json").is_file():
            GenerationConfig.from_pretrained(src).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(src).save_pretrained(tmp)  # tokenizer files and chat template
        if to.exists():
            to.rmdir()  # an empty folder the user made for it
        tmp.rename(to)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return to
