"""Policy versions on disk: atomic checkpoint dirs, crash recovery, retention.

A version v >= 1 is the directory ``store.checkpoint_dir(run, v)``, committed in one rename:

    model.safetensors, config.json, generation_config.json   the weights (float32) for vLLM/transformers
    tokenizer files                                          copied from the base model
    optimizer.pt                                             AdamW state + RNG state (latest version only)
    trainer_state.json                                       step counters and the policies/steps rows

Commit order of an applied step: checkpoint dir -> ``policies`` row -> ``steps`` row. A crash
between them leaves a committed dir without its rows; ``recover_rows`` re-appends them from
``trainer_state.json`` (appends are idempotent per shard id, so nothing is ever written twice).
Version 0 is the base model itself: a ``policies`` row pointing at its directory, no copy.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from recpipe.schema import SCHEMA_VERSION
from recpipe.store import Store
from recpipe.store.files import commit_dir, fsync_dir

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
WEIGHTS_FILE = "model.safetensors"
STATE_FORMAT = 1
_TOKENIZER_FILES = ("special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt",
                    "added_tokens.json", "tokenizer.model")
_VERSION_DIR = re.compile(r"^v(\d{6})$")

# What retention may keep besides the latest: a set of versions, or a callable returning one
# (asked at each retention pass, e.g. the versions the generator still samples from).
Needed = Iterable[int] | Callable[[], Iterable[int]] | None


def policies_shard(version: int) -> str:
    return f"v{version:06d}"


def steps_shard(step: int) -> str:
    return f"step-{step:06d}"


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def relative_to_store(store: Store, path: Path) -> str:
    """Checkpoint column value: relative to the store when inside it, else absolute."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(store.root))
    except ValueError:
        return str(path)


def resolve_checkpoint(store: Store, checkpoint: str) -> Path:
    """The directory a ``policies.checkpoint`` value names."""
    path = Path(checkpoint)
    return path if path.is_absolute() else store.root / path


def is_complete(path: Path) -> bool:
    """A committed version dir (commit_dir renames only finished dirs; this also rejects stray dirs)."""
    return (path / WEIGHTS_FILE).is_file() and (path / "config.json").is_file() and (path / STATE_FILE).is_file()


def version_dirs(store: Store, run: str) -> dict[int, Path]:
    """Committed checkpoint dirs of a run by version (temporary dirs of killed writers are ignored)."""
    base = store.root / "checkpoints" / run
    if not base.is_dir():
        return {}
    found = {}
    for child in base.iterdir():
        match = _VERSION_DIR.match(child.name)
        if match and is_complete(child):
            found[int(match.group(1))] = child
    return found


# ---- rows <-> JSON (trainer_state.json holds the rows so a crash between commits can be healed) ----

def _to_json(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, dt.datetime) else v for k, v in row.items()}


def _from_json(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    if isinstance(out.get("created_at"), str):
        out["created_at"] = dt.datetime.fromisoformat(out["created_at"])
    return out


def policies_row(run: str, version: int, step: int | None, checkpoint: str, parent: int | None,
                 base_model: str) -> dict[str, Any]:
    return {"run": run, "version": version, "step": step, "checkpoint": checkpoint, "parent_version": parent,
            "base_model": base_model, "created_at": now(), "schema_version": SCHEMA_VERSION}


# ---- writing a version ------------------------------------------------------------------------

def _copy_tokenizer(src: Path, dst: Path) -> None:
    for path in sorted(src.iterdir()):
        if path.is_file() and (path.name.startswith("tokenizer") or path.name in _TOKENIZER_FILES):
            shutil.copy2(path, dst / path.name)


def write_checkpoint(final: Path, model: torch.nn.Module, tokenizer_dir: Path, optimizer_state: dict[str, Any],
                     state: dict[str, Any]) -> None:
    """Commit one version dir atomically (see the module docstring for its files)."""
    from transformers.utils import logging as hf_logging

    def write(tmp: Path) -> None:
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # one "Writing model shards" bar per step is noise
        try:
            model.save_pretrained(tmp)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        _copy_tokenizer(tokenizer_dir, tmp)
        torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(_to_json_state(state), indent=1, sort_keys=True) + "\n")

    commit_dir(final, write)


def _to_json_state(state: dict[str, Any]) -> dict[str, Any]:
    out = dict(state)
    for key in ("policies_row", "steps_row"):
        if out.get(key) is not None:
            out[key] = _to_json(out[key])
    return out


def read_state(path: Path) -> dict[str, Any]:
    state = json.loads((path / STATE_FILE).read_text())
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path / STATE_FILE}: format {state.get('format')!r}; this recpipe reads {STATE_FORMAT}")
    for key in ("policies_row", "steps_row"):
        if state.get(key) is not None:
            state[key] = _from_json(state[key])
    return state


def recover_rows(store: Store, run: str) -> list[int]:
    """Append the policies/steps rows of committed versions that lack them; returns the healed versions."""
    healed = []
    for version, path in sorted(version_dirs(store, run).items()):
        state = read_state(path)
        wrote = store.append("policies", [state["policies_row"]], shard_id=policies_shard(version))
        wrote |= store.append("steps", [state["steps_row"]], shard_id=steps_shard(state["step"]))
        if wrote:
            healed.append(version)
    return healed


# ---- retention ----------------------------------------------------------------------------------

def _remove_dir(path: Path) -> None:
    # Rename first: a half-deleted dir must never look like a committed version (the temp name is
    # skipped by readers and cleaned by `recpipe doctor` if we die mid-rmtree).
    doomed = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    os.rename(path, doomed)
    fsync_dir(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def versions_to_keep(versions: Iterable[int], latest: int, keep_every: int, needed: Needed) -> set[int]:
    """The latest, every keep_every-th version, and those ``needed`` returns (e.g. in use by the generator)."""
    wanted = needed() if callable(needed) else (needed or ())
    return {v for v in versions if v == latest or v % keep_every == 0} | ({int(v) for v in wanted} & set(versions))


def apply_retention(store: Store, run: str, latest: int, keep_every: int, needed: Needed = None) -> list[int]:
    """Delete version dirs no rule keeps; drop optimizer state from every version but the latest.

    The policies rows stay (history); their checkpoint path then no longer exists. Returns the removed versions.
    """
    dirs = version_dirs(store, run)
    keep = versions_to_keep(dirs, latest, keep_every, needed)
    removed = []
    for version, path in sorted(dirs.items()):
        if version not in keep:
            _remove_dir(path)
            removed.append(version)
        elif version != latest:
            (path / OPTIMIZER_FILE).unlink(missing_ok=True)
    return removed
