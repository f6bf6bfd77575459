"""Policy versions on disk: atomic checkpoint dirs, crash recovery, retention.

A version v >= 1 is the directory ``store.checkpoint_dir(run, v)``, committed in one rename:

    model.safetensors, config.json, generation_config.json   the weights (float32) for vLLM/transformers,
                                                             consolidated (one file whatever the ranks)
    tokenizer files                                          copied from the base model
    optimizer.pt                                             RNG state, ranks (latest version only)
    .metadata, __<rank>_0.distcp                             AdamW state, sharded by torch.distributed.checkpoint
                                                             (each rank writes its shard; a resume on any number
                                                             of ranks reshards it; latest version only)
    trainer_state.json                                       step counters and the policies/steps rows
    manifest.json                                            size and sha256 of every other file

Commit order of an applied step: checkpoint dir -> ``policies`` row -> ``steps`` row. A crash
between them leaves a committed dir without its rows; ``recover_rows`` re-appends them from
``trainer_state.json`` (appends are idempotent per shard id, so nothing is ever written twice).
Version 0 is the base model itself: a ``policies`` row pointing at its directory, no copy.

Integrity: a committed dir can still be damaged later (a bad disk, a stray write). Every load of a
store version (trainer resume, sampling engine) first checks the files against ``manifest.json``
(``check_checkpoint``); ``verify_checkpoint`` lists the problems for ``recpipe doctor``. sha256
runs at ~1 GB/s on one core with SHA-NI; for SmolLM2-135M (538 MB of weights, 1.08 GB of AdamW
state) a sampling engine's check costs ~0.5 s, a resume's ~1.6 s, a write hashes the weights while
the optimizer state is serialized.

Retention keeps the latest two versions, every keep_every-th, and every version a later step of the
same schedule can still sample from (``future_versions``), whatever the run's length: a loop
extended with more steps must find them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from recpipe.errors import RecpipeError
from recpipe.schema import SCHEMA_VERSION, table_spec
from recpipe.store import Store, objects
from recpipe.store.files import StoreWriteError, commit_dir, fsync_dir

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
STATE_FORMAT = 1
MANIFEST_FORMAT = 1
HASH = "sha256"
_TOKENIZER_FILES = ("special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt",
                    "added_tokens.json", "tokenizer.model")
_VERSION_DIR = re.compile(r"^v(\d{6})$")

# What retention may keep besides the latest: a set of versions, or a callable returning one
# (asked at each retention pass, e.g. the versions the generator still samples from).
Needed = Iterable[int] | Callable[[], Iterable[int]] | None


def policies_shard(version: int) -> str:
    return table_spec("policies").shard_id(version=version)


def steps_shard(step: int) -> str:
    return table_spec("steps").shard_id(step=step)


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
    """Committed checkpoint dirs of a run by version (temporary dirs of killed writers are ignored).

    On a remote store: the versions complete on its storage, by the path of their local copy in this
    machine's cache, which may not be there yet (``local_version`` fetches it).
    """
    if not store.location.is_local:
        names = objects.remote_dirs(store, f"checkpoints/{run}", MANIFEST_FILE)
        return {int(m.group(1)): store.checkpoint_dir(run, int(m.group(1)))
                for m in map(_VERSION_DIR.match, names) if m}
    base = store.root / "checkpoints" / run
    if not base.is_dir():
        return {}
    found = {}
    for child in base.iterdir():
        match = _VERSION_DIR.match(child.name)
        if match and is_complete(child):
            found[int(match.group(1))] = child
    return found


def publish_version(store: Store, run: str, version: int) -> None:
    """Upload a version written locally to a remote store's storage (manifest last); no-op on a local store."""
    objects.publish_dir(store, store.checkpoint_dir(run, version), store.checkpoint_key(run, version), MANIFEST_FILE)


def local_version(store: Store, run: str, version: int) -> Path:
    """The local directory of ``version``: on a remote store, fetched into this machine's cache unless a copy
    there already matches its manifest. CheckpointError if the version is not on the store's storage."""
    path = store.checkpoint_dir(run, version)
    if store.location.is_local or (is_complete(path) and not verify_checkpoint(path, "skip")):
        return path
    try:
        return objects.fetch_dir(store, store.checkpoint_key(run, version), path)
    except FileNotFoundError:
        raise CheckpointError(f"run {run!r}: version v{version:06d} is not in {store.uri}/checkpoints/{run} "
                              "(not trained yet, or removed by retention)") from None


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
                     state: dict[str, Any],
                     gather: Callable[[Path], dict[str, torch.Tensor] | None] | None = None,
                     save_optimizer: Callable[[Path], None] | None = None) -> None:
    """Commit one version dir atomically (see the module docstring for its files).

    optimizer_state: what optimizer.pt holds (RNG state, ranks). gather(tmp): the consolidated model
    state dict when the model is sharded (None: ``model``'s own). save_optimizer(tmp): writes the sharded
    optimizer state into the temp dir. Under torchrun both are collectives the other ranks join in the
    same order (``trainer.follow``). Raises StoreWriteError (nothing committed) when a file cannot be
    written, e.g. the disk is full.
    """
    from transformers.utils import logging as hf_logging

    def write(tmp: Path) -> None:
        full = gather(tmp) if gather is not None else None
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # one "Writing model shards" bar per step is noise
        try:
            with _writing(final, tmp, WEIGHTS_FILE):
                model.save_pretrained(tmp, state_dict=full)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        with ThreadPoolExecutor(max_workers=1) as hasher:
            # The weights hash while the rest is written (hashlib releases the GIL).
            weights = hasher.submit(_digest, tmp / WEIGHTS_FILE)
            with _writing(final, tmp, "tokenizer files"):
                _copy_tokenizer(tokenizer_dir, tmp)
            with _writing(final, tmp, OPTIMIZER_FILE):
                if save_optimizer is not None:
                    save_optimizer(tmp)
                torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
            with _writing(final, tmp, STATE_FILE):
                (tmp / STATE_FILE).write_text(json.dumps(_to_json_state(state), indent=1, sort_keys=True) + "\n")
            with _writing(final, tmp, MANIFEST_FILE):
                write_manifest(tmp, {WEIGHTS_FILE: weights.result()})  # last: it covers every file above

    commit_dir(final, write)


def is_optimizer_file(name: str) -> bool:
    """optimizer.pt and the sharded AdamW state beside it: kept in the latest version only."""
    return name in (OPTIMIZER_FILE, ".metadata") or name.endswith(".distcp")


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The consolidated weights of an FSDP2-sharded ``compute.PolicyLogprobs``, by the transformers model's
    names, on rank 0 (CPU; empty elsewhere). Collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    full = {k.removeprefix("policy."): v for k, v in full.items()}
    policy = module.policy
    if getattr(policy.config, "tie_word_embeddings", False):
        # Gathered, a tied LM head is a second copy of the embedding: save it once, as one process does.
        head = policy.get_output_embeddings()
        full.pop(next(f"{n}.weight" for n, m in policy.named_modules() if m is head), None)
    return full


def save_optimizer_shards(path: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write the optimizer state into ``path`` with torch.distributed.checkpoint (each rank its shard;
    one process: all of it). Collective under torchrun."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    try:
        dcp.save({"optimizer": get_optimizer_state_dict(module, optimizer)}, checkpoint_id=str(path),
                 no_dist=not torch.distributed.is_initialized())
    except CheckpointException as exc:  # a BaseException: turned into an error the writer reports (disk full...)
        first = next(iter(exc.failures.values()), exc)
        cause = getattr(first, "exc", first)
        raise RuntimeError(f"{type(cause).__name__}: {cause}".splitlines()[0]) from exc


def load_optimizer_shards(path: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load what ``save_optimizer_shards`` wrote, on any number of ranks (DCP reshards by parameter name)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path / '.metadata'}: the sharded optimizer state is missing")
    state = {"optimizer": get_optimizer_state_dict(module, optimizer)}  # allocates the state to load into
    dcp.load(state, checkpoint_id=str(path), no_dist=not torch.distributed.is_initialized())
    set_optimizer_state_dict(module, optimizer, state["optimizer"])


@contextlib.contextmanager
def _writing(final: Path, tmp: Path, name: str) -> Iterator[None]:
    """Turn any failure to write ``name`` into StoreWriteError: torch.save reports a full disk as
    RuntimeError("unexpected pos ..."), safetensors as SafetensorError, neither as OSError."""
    try:
        yield
    except (StoreWriteError, KeyboardInterrupt):
        raise
    except Exception as exc:
        code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
        if code == errno.ENOSPC or "os error 28" in str(exc) or _disk_full(tmp):
            code, reason = errno.ENOSPC, "no space left on device"
        else:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StoreWriteError(code, f"could not write checkpoint {final} ({name}): {reason}; nothing was "
                                    "committed, the earlier versions are untouched") from exc


def _disk_full(path: Path) -> bool:
    # A write that failed with (almost) no space left failed for that reason, whatever the library said.
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 1 << 20


# ---- integrity: manifest.json (size and sha256 of every file) ---------------------------------------

class CheckpointError(RecpipeError, ValueError):
    """A version dir is gone or damaged; nothing was loaded from it. The message says what to do."""


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, HASH).hexdigest()


def _digests(root: Path, names: list[str]) -> dict[str, str]:
    # hashlib releases the GIL on large buffers: weights and optimizer state hash on two cores at once.
    with ThreadPoolExecutor(max_workers=max(1, min(4, len(names)))) as pool:
        return dict(zip(names, pool.map(lambda name: _digest(root / name), names), strict=True))


def write_manifest(path: Path, known: dict[str, str] | None = None) -> None:
    """Record size and sha256 of every file of the version dir ``path`` in its manifest.json.

    known: digests already computed (file name -> hex), e.g. while the writer was busy with another file.
    """
    names = sorted(p.name for p in path.iterdir() if p.is_file() and p.name != MANIFEST_FILE)
    digests = {**_digests(path, [n for n in names if n not in (known or {})]), **(known or {})}
    files = {name: {"bytes": (path / name).stat().st_size, HASH: digests[name]} for name in names}
    manifest = {"format": MANIFEST_FORMAT, "hash": HASH, "files": files}
    (path / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def verify_checkpoint(path: Path, optimizer: str = "if-present") -> list[str]:
    """Problems of the version dir ``path``, each naming its file; empty when it is intact.

    Checks that the model, config, trainer-state and manifest files are there, and every file the
    manifest lists has its recorded size and sha256. optimizer.pt: "if-present" checks it when there
    (retention drops it from all but the latest version), "required" also when absent, "skip" never
    (a sampling engine does not read it). What ``recpipe doctor`` calls for each version dir.
    """
    path = Path(path)
    if optimizer not in ("if-present", "required", "skip"):
        raise ValueError(f"optimizer={optimizer!r}; allowed: if-present, required, skip")
    if not path.is_dir():
        return [f"{path}: version dir missing"]
    required = [WEIGHTS_FILE, "config.json", STATE_FILE] + ([OPTIMIZER_FILE] if optimizer == "required" else [])
    problems = [f"{path / name}: missing" for name in required if not (path / name).is_file()]
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or manifest.get("hash") != HASH or not isinstance(files, dict):
            raise ValueError(f"format {manifest.get('format')!r}, hash {manifest.get('hash')!r}")
    except FileNotFoundError:
        return problems + [f"{path / MANIFEST_FILE}: missing, the files cannot be verified"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return problems + [f"{path / MANIFEST_FILE}: unreadable ({exc})"]
    problems += [f"{path / name}: not in {MANIFEST_FILE}" for name in required
                 if name not in files and (path / name).is_file()]
    to_hash = []
    for name, want in sorted(files.items()):
        file = path / name
        if is_optimizer_file(name) and optimizer == "skip":
            continue
        if is_optimizer_file(name) and name != OPTIMIZER_FILE and not (path / OPTIMIZER_FILE).is_file():
            continue  # the optimizer state as a whole is gone (retention), or "optimizer.pt: missing" says so
        if not file.is_file():
            optional = is_optimizer_file(name) and optimizer != "required"
            if not optional and f"{file}: missing" not in problems:
                problems.append(f"{file}: missing")
            continue
        size = file.stat().st_size
        if size != want.get("bytes"):
            problems.append(f"{file}: {size} bytes, {want.get('bytes')} when written (truncated or overwritten)")
        else:
            to_hash.append(name)
    for name, digest in _digests(path, to_hash).items():
        if digest != files[name].get(HASH):
            problems.append(f"{path / name}: {HASH} differs from the one recorded when it was written "
                            "(the file was changed or damaged since)")
    return problems


def verify_checkpoints(store: Store, run: str | None = None) -> dict[Path, list[str]]:
    """The damaged version dirs of ``run`` (default: every run) with their problems; what ``recpipe doctor``
    reports. Every ``vNNNNNN`` dir counts, also one missing its weights (``version_dirs`` skips those); the
    newest of a run must keep its optimizer state, since a resume loads it. Writers' temp dirs are skipped."""
    base = store.root / "checkpoints"
    if run is not None:
        runs = [base / run]
    else:
        runs = sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    found = {}
    for run_dir in runs:
        dirs = sorted(p for p in run_dir.iterdir() if _VERSION_DIR.match(p.name)) if run_dir.is_dir() else []
        for path in dirs:
            problems = verify_checkpoint(path, "required" if path == dirs[-1] else "if-present")
            if problems:
                found[path] = problems
    return found


def check_checkpoint(path: Path, version: int, optimizer: str = "if-present") -> None:
    """Raise CheckpointError naming the damaged files of store version ``version`` and what to do."""
    problems = verify_checkpoint(path, optimizer)
    if problems:
        raise CheckpointError(f"{damaged_version_message(path, version)}: {'; '.join(problems)}. "
                              f"{what_to_do(path)}")


def damaged_version_message(path: Path, version: int) -> str:
    return f"run {Path(path).parent.name!r}: version v{version:06d} ({path}) is damaged, nothing was loaded from it"


def what_to_do(path: Path) -> str:
    """How to continue a run whose version dir under ``path`` (store/checkpoints/RUN/vN) is unusable."""
    path = Path(path)
    run, store = path.parent.name, path.parents[2]
    return (f"`recpipe doctor --store {store}` lists damaged checkpoints. Run {run!r} cannot continue without "
            f"{path.name}: restore it from a backup, or start a new run from the archived batches (replayed from "
            f"the base model): `recpipe retrain --from-run {run} --run NEW_RUN --store {store}`")


def _to_json_state(state: dict[str, Any]) -> dict[str, Any]:
    out = dict(state)
    for key in ("policies_row", "steps_row"):
        if out.get(key) is not None:
            out[key] = _to_json(out[key])
    return out


def read_state(path: Path) -> dict[str, Any]:
    """The trainer state of a version dir; CheckpointError naming the file when it is unreadable."""
    file = path / STATE_FILE
    try:
        state = json.loads(file.read_text())
        if not isinstance(state, dict):
            raise ValueError(f"a JSON {type(state).__name__}, not an object")
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{file}: unreadable trainer state ({exc}). {what_to_do(path)}") from exc
    if state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{file}: format {state.get('format')!r}; this recpipe reads {STATE_FORMAT}")
    for key in ("policies_row", "steps_row"):
        if state.get(key) is not None:
            state[key] = _from_json(state[key])
    return state


def recover_rows(store: Store, run: str) -> list[int]:
    """Append the policies/steps rows of committed versions that lack them; returns the healed versions."""
    healed = []
    steps_of = None
    for version in sorted(version_dirs(store, run)):
        if not store.location.is_local and store.is_committed("policies", {"run": run}, policies_shard(version)):
            # A remote version is fetched only if a row is missing: its steps row (from the policies row's step).
            if steps_of is None:
                rows = store.read("policies", "run = $run", {"run": run})
                steps_of = dict(zip(rows.column("version").to_pylist(), rows.column("step").to_pylist(), strict=True))
            if store.is_committed("steps", {"run": run}, steps_shard(steps_of[version])):
                continue
        path = local_version(store, run, version)
        try:
            state = read_state(path)
        except CheckpointError:
            # A damaged older version whose rows are committed has nothing to heal: it must not stop a
            # run that may never load it again (a load verifies it; `recpipe doctor` reports it).
            if store.is_committed("policies", {"run": run}, policies_shard(version)):
                continue
            raise
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
    """The latest two, every keep_every-th version, and those ``needed`` returns (e.g. in use by the generator).

    Two, not one: a damaged latest version then still leaves its parent's weights on disk.
    """
    versions = set(versions)
    wanted = needed() if callable(needed) else (needed or ())
    newest = set(sorted(v for v in versions if v <= latest)[-2:])
    return {v for v in versions if v in newest or v % keep_every == 0} | ({int(v) for v in wanted} & versions)


def future_versions(version_of_step: Callable[[int], int], from_step: int, current: int, max_lag: int) -> set[int]:
    """The existing versions (<= current) that step ``from_step`` or any later step samples from.

    For retention: a run may be continued with more steps than it was started with, so no bound on
    the run's length is used. ``version_of_step`` must be non-decreasing with v(s) >= s - max_lag; the
    schedule v(s) = max(0, floor((s - o) / k) * k) is, with max_lag = k + o. Then no step past
    current + max_lag uses an existing version, and every version below v(from_step) is never used again.
    """
    return {v for s in range(from_step, current + max_lag + 1) if (v := version_of_step(s)) <= current}


def apply_retention(store: Store, run: str, latest: int, keep_every: int, needed: Needed = None) -> list[int]:
    """Delete version dirs no rule keeps; drop optimizer state from every version but the latest.

    The policies rows stay (history); their checkpoint path then no longer exists. Returns the removed versions.
    """
    dirs = version_dirs(store, run)
    keep = versions_to_keep(dirs, latest, keep_every, needed)
    removed = []
    for version, path in sorted(dirs.items()):
        if version not in keep:
            objects.delete_dir(store, store.checkpoint_key(run, version), MANIFEST_FILE)
            if path.exists():
                _remove_dir(path)
            removed.append(version)
        elif version != latest:
            names = [p.name for p in path.iterdir() if is_optimizer_file(p.name)] if path.is_dir() else []
            for name in sorted(set(names) | {OPTIMIZER_FILE}):
                (path / name).unlink(missing_ok=True)
                if not store.location.is_local:
                    with contextlib.suppress(FileNotFoundError):
                        store.location.fs.delete_file(store.location.path(store.checkpoint_key(run, version), name))
    return removed
