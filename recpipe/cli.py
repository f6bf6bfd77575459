"""The ``recpipe`` command line: one command per pipeline stage.

    recpipe init --store store
    recpipe sql --store store "SELECT policy_version, avg(reward) FROM rollouts GROUP BY 1"
    recpipe loop --model smollm2 --task arithmetic --steps 4 --store store

Every command takes ``--config FILE`` and ``--set section.field=value``. A user error
(recpipe.errors.RecpipeError) prints one clear line and exits 2 without touching the store; any other
exception is a bug and shows its traceback.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import inspect
import json
import logging
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from recpipe.config import RecpipeConfig, load_config, to_params
from recpipe.errors import OptionError, RecpipeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Offline off-policy RL pipeline: generate -> select -> train over a Delta Lake archive.")
console = Console(stderr=True, soft_wrap=True)
out = Console()

F = TypeVar("F", bound=Callable[..., Any])

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override: section.field=value (repeatable).")]
StoreOpt = Annotated[str | None, typer.Option("--store", help="Archive: a directory or s3://bucket/prefix "
                                                               "(overrides config `store`).")]
AsOfOpt = Annotated[str | None, typer.Option("--as-of", help="Read the archive as it was: a table version (12), "
                                             "versions per table (groups=41,rollouts=40 or JSON), or an ISO time.")]
RunOpt = Annotated[str | None, typer.Option("--run", help="Run name (overrides config `run`).")]


# The OSErrors the user can act on: a path is missing, in the way, or not theirs to read or write, or the
# disk is full or read-only. Any other OSError (an I/O error, a bad file descriptor...) is a bug.
USER_OS_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
USER_OS_ERRNOS = frozenset({errno.EROFS, errno.ENOSPC, errno.EDQUOT})


def user_error(exc: BaseException, user_sql: bool = False) -> bool:
    """Whether ``exc`` is the user's to fix (one line, exit code 2) rather than a bug (its traceback): a
    RecpipeError, an OSError of USER_OS_ERRORS / USER_OS_ERRNOS, or, where the command runs the user's
    SQL, DuckDB's error about that SQL."""
    if isinstance(exc, RecpipeError):
        return True
    if isinstance(exc, OSError):
        return isinstance(exc, USER_OS_ERRORS) or exc.errno in USER_OS_ERRNOS
    if user_sql:
        import duckdb

        return isinstance(exc, duckdb.Error)
    return False


class _UserErrorFilter(logging.Filter):
    """Prefect logs an exception raised inside a flow or task with its traceback, then re-raises it; for
    the errors that ``friendly_errors`` reports in one line, that traceback is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and record.exc_info[1] is not None and user_error(record.exc_info[1]))


_QUIET = _UserErrorFilter()


def friendly_errors(fn: F, user_sql: bool = False) -> F:
    """A user error (``user_error``) becomes one red line and exit code 2; any other exception is a bug
    and propagates with its traceback (exit code 1)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for name in ("prefect.flow_runs", "prefect.task_runs"):
            logging.getLogger(name).addFilter(_QUIET)  # a no-op when it is there already
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if not user_error(exc, user_sql):
                raise
            console.print(f"[bold red]error:[/] {type(exc).__name__}: {exc}", highlight=False, markup=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


class Stopped(BaseException):
    """SIGINT or SIGTERM arrived: unwinds the command from wherever it was, like a kill -9 that runs the
    ``finally`` blocks (locks released, nothing half-committed: commits are atomic and idempotent, so an
    abandoned shard or step is simply redone on resume). A BaseException, so no ``except Exception``
    (Prefect's task retries included) takes it for a failure to retry."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# The shell's convention for "ended by signal N": 128 + N (130 for SIGINT, 143 for SIGTERM).
def _exit_code(signum: int) -> int:
    return 128 + signum


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[Callable[[], list[int]]]:
    """SIGINT and SIGTERM raise ``Stopped`` in the main thread; yields a function that returns the stop
    signals received so far.

    Installed whatever the inherited disposition: a shell starts a background job (``recpipe loop &``)
    with SIGINT ignored, and Python then keeps ignoring it, so ``kill -INT`` did nothing. A second
    signal while the first one unwinds exits at once.

    While a Prefect flow runs, Prefect's SIGTERM handler replaces ours and raises its own exception,
    which a library in between may rewrap (DuckDB turns an exception raised inside its scan of a Python
    dataset into "Query interrupted" or an InvalidInputException), so neither handler may ever learn of
    the signal. The interpreter's C-level handler writes every signal's number to the wakeup fd whatever
    Python handler is installed: that pipe is the record of what arrived."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # signal.signal works only there
        yield lambda: received
        return
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def arrived() -> list[int]:
        while True:
            try:
                data = os.read(read_end, 256)
            except BlockingIOError:
                return received
            if not data:
                return received
            received.extend(sig for sig in data if sig in _STOP_SIGNALS)

    handled: list[int] = []  # the signals this handler ran for (Prefect re-sends the one it caught)

    def handler(signum: int, frame: Any) -> None:
        handled.append(signum)
        if not arrived():  # the wakeup write can fail (a full pipe): count the signal anyway
            received.append(signum)
        recipe = sys.modules.get("recpipe.recipe")
        if recipe is not None:  # every later verb refuses to start, whatever swallowed the Stopped below
            recipe.STOP.set()
        if len(handled) > 1:
            os._exit(_exit_code(received[0]))
        # What the pipeline's libraries log while they unwind ("Crash detected!" from Prefect...) is
        # noise after a stop the user asked for: one line below says what happened.
        logging.disable(logging.CRITICAL)
        raise Stopped(signum)

    previous = {sig: signal.signal(sig, handler) for sig in _STOP_SIGNALS}
    previous_fd = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    quiet = _SignalCrashFilter()
    prefect_loggers = [logging.getLogger(name) for name in ("prefect.flow_runs", "prefect.task_runs")]
    for logger in prefect_loggers:
        logger.addFilter(quiet)
    try:
        yield arrived
    finally:
        if not arrived():  # after a stop the handler stays: a second signal during shutdown exits at once
            for sig, old in previous.items():
                signal.signal(sig, old)
            signal.set_wakeup_fd(previous_fd)
            os.close(read_end)
            os.close(write_end)
            for logger in prefect_loggers:
                logger.removeFilter(quiet)


class _SignalCrashFilter(logging.Filter):
    """While a flow runs, Prefect's own SIGTERM handler replaces ours: it turns the signal into a crash of
    the flow, logs it ("Crash detected! Execution was aborted by a termination signal."), then hands the
    signal back to our handler. Those lines repeat the one stop line we print: drop them."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return "aborted by a termination signal" not in text and "aborted by an interrupt signal" not in text


def stoppable(fn: F) -> F:
    """Let SIGINT (Ctrl-C) and SIGTERM stop a long command within seconds: one line saying it stopped and
    how to resume, exit code 130 / 143, no traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _stop_on_signals() as arrived:
            try:
                result = fn(*args, **kwargs)
            except BaseException:
                if not arrived():
                    raise
                # Stopped, or what a library made of it while unwinding: either way the run was stopped.
            else:
                if not arrived():
                    return result
                # The signal landed where a library swallowed it (Prefect ignores a BaseException raised
                # after the flow's code finished): it still decides the exit code.
            received = arrived()
        name = signal.Signals(received[0]).name
        again = shlex.join(["recpipe", *sys.argv[1:]])
        console.print(f"[bold yellow]stopped[/] by {name}: committed work is kept and the run's lock is "
                      f"released; resume with: {again}", highlight=False, soft_wrap=True)
        # Exit handlers (Prefect's server stop, engine close) run; the interpreter's final garbage
        # collection over torch, Prefect and vLLM objects (~5 s on 2 busy cores) is skipped: every commit
        # is already on disk, and the user is waiting.
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_code(received[0]))

    return wrapper  # type: ignore[return-value]


VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Show the libraries' own output (vLLM, torch, "
                                          "Prefect, safetensors) instead of writing it to a log file.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines or bars (for scripts); errors "
                                        "and results still print.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the resolved config (YAML) and exit; the store "
                                         "is not touched.")]
ModelOpt = Annotated[str | None, typer.Option("--model", help="tiny | smollm2 | PATH to a HF checkpoint.")]
TaskOpt = Annotated[str | None, typer.Option("--task", help="arithmetic | gsm8k | a plugin task.")]
PresetOpt = Annotated[str | None, typer.Option("--preset", help="Loss preset (docs/algorithms.md).")]
StepsOpt = Annotated[int | None, typer.Option("--steps", help="Training steps.")]
SyncIntervalOpt = Annotated[int | None, typer.Option("--sync-interval", help="k (docs/algorithms.md).")]
SyncOffsetOpt = Annotated[int | None, typer.Option("--sync-offset", help="o (docs/algorithms.md).")]

# The options commands share, declared once: parameter -> (typer annotation, default, config field it sets).
SHARED: dict[str, tuple[Any, Any, str | None]] = {
    "config": (ConfigOpt, None, None),
    "set_": (SetOpt, None, None),
    "store": (StoreOpt, None, "store"),
    "run": (RunOpt, None, "run"),
    "steps": (StepsOpt, None, "loop.steps"),
    "preset_": (PresetOpt, None, "loss.preset"),
    "sync_interval": (SyncIntervalOpt, None, "loop.sync_interval"),
    "sync_offset": (SyncOffsetOpt, None, "loop.sync_offset"),
    "model": (ModelOpt, None, "model.name"),
    "task": (TaskOpt, None, "task.name"),
    "dry_run": (DryRunOpt, False, None),
}
CONFIG = ("config", "set_", "store")  # every command's
RUN = (*CONFIG, "run")
LOOP = (*RUN, "steps", "preset_", "sync_interval", "sync_offset", "model", "task")  # a run's loop settings


class Options:
    """The shared options a command was given (``SHARED``), and the config they resolve to."""

    def __init__(self, given: dict[str, Any]):
        self.given = given

    def build(self, extra: dict[str, Any] | None = None) -> RecpipeConfig:
        """The config file, then --set, then the shared options, then ``extra`` (config field -> value;
        None = not given)."""
        fields = {key: self.given.get(name) for name, (_, _, key) in SHARED.items() if key}
        items = list(self.given.get("set_") or [])
        for key, value in {**fields, **(extra or {})}.items():
            if value is not None:
                items.append(f"{key}={value if isinstance(value, str) else json.dumps(value)}")
        return load_config(self.given.get("config"), items)

    def config(self, extra: dict[str, Any] | None = None) -> RecpipeConfig:
        """``build``, then ``check``: the config of a command that runs the pipeline."""
        return self.check(self.build(extra))

    def check(self, cfg: RecpipeConfig) -> RecpipeConfig:
        """Resolve the task and the model before anything starts (bad names fail here, the store untouched);
        with --dry-run, print the resolved config and exit."""
        from recpipe.recipe import preflight

        preflight(cfg)
        if self.given.get("dry_run"):
            from recpipe.config import dump_config

            out.print(dump_config(cfg), end="", highlight=False, markup=False, soft_wrap=True)
            raise typer.Exit()
        return cfg

    @contextlib.contextmanager
    def console(self, command: str, verbose: bool, quiet: bool) -> Iterator[None]:
        """--verbose / --quiet. Unless --verbose, the libraries' output goes to a log file
        (recpipe.progress.library_output) and stderr holds only recpipe's lines."""
        from recpipe import progress

        if verbose and quiet:
            raise OptionError("give --verbose or --quiet, not both")
        progress.OUTPUT.verbose, progress.OUTPUT.quiet = verbose, quiet
        if self.given.get("dry_run"):
            yield
            return
        try:  # only to place the log file: a bad config is the command's own error to report
            store = self.build().store
        except Exception:
            store = None
        with progress.library_output(console, command, store):
            yield


def command(*shared: str, long: bool = False, user_sql: bool = False) -> Callable[[F], F]:
    """Register ``fn`` as a command that takes the ``shared`` options besides its own parameters; they
    reach ``fn`` as its first argument, an ``Options``. Expected errors print as one line (friendly_errors).

    long: a pipeline command; it also takes --verbose / --quiet (``Options.console``) and stops within
    seconds on SIGINT / SIGTERM (``stoppable``). user_sql: the command runs SQL the user wrote, so DuckDB's
    errors are theirs too (a bad column, a failed cast)."""

    def decorate(fn: F) -> F:
        body = stoppable(fn) if long else fn

        @wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            opts = Options({name: kwargs.pop(name) for name in shared})
            if not long:
                return body(opts, **kwargs)
            with opts.console(fn.__name__, kwargs.pop("verbose"), kwargs.pop("quiet")):
                return body(opts, **kwargs)

        keyword = inspect.Parameter.KEYWORD_ONLY
        own = [p.replace(kind=keyword) for p in list(inspect.signature(fn, eval_str=True).parameters.values())[1:]]
        added = {name: SHARED[name][:2] for name in shared}
        if long:
            added.update(verbose=(VerboseOpt, False), quiet=(QuietOpt, False))
        params = [*(inspect.Parameter(n, keyword, default=d, annotation=a) for n, (a, d) in added.items()), *own]
        wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        app.command(fn.__name__)(friendly_errors(wrapper, user_sql))
        return fn

    return decorate


def open_store(cfg: Any, create: bool = False) -> Any:
    from recpipe.store import Store

    return (Store.create if create else Store)(cfg.store, cfg.storage_options or None)


def at_least(option: str, value: int | None, low: int) -> None:
    """Refuse a too-small numeric option before anything runs (``--prompts 0`` used to mean the default)."""
    if value is not None and value < low:
        raise OptionError(f"{option} must be an integer >= {low} (got {value})")


def print_table(table: Any, fmt: str = "table", title: str | None = None) -> None:
    """Print a pyarrow table as a rich table, CSV or JSON lines (recpipe.output)."""
    from recpipe import output

    if fmt == "json":
        output.write_json_lines(table, sys.stdout)
    elif fmt == "csv":
        output.write_csv(table, sys.stdout)
    else:
        out.print(output.rich_table(table, title=title))
        console.print(f"{table.num_rows} row(s)")


@command(*CONFIG)
def init(opts: Options) -> None:
    """Create an empty archive. Example: recpipe init --store store"""
    st = open_store(opts.build(), create=True)
    console.print(f"store ready at {st.root}")


@command(*CONFIG, user_sql=True)
def sql(
    opts: Options,
    query: Annotated[str, typer.Argument(help="A read-only SQL query over the tables.")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="table | csv | json (JSON lines) | parquet "
                                     "(needs --output)")] = "table",
    output_path: Annotated[str | None, typer.Option("--output", "-o", help="Write the result to this file "
                                                    "(outside the archive) instead of stdout.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds before the query is interrupted.")] = 60.0,
    as_of: AsOfOpt = None,
) -> None:
    """Query the archive with SQL (read-only). Example: recpipe sql --store store "SELECT count(*) FROM rollouts" """
    from recpipe import output
    from recpipe.store import parse_as_of
    from recpipe.store.sql import run_read_only

    if fmt not in output.FORMATS:
        raise OptionError(f"--format must be one of {', '.join(output.FORMATS)} (got {fmt!r})")
    cfg = opts.build()
    target = output.output_target(output_path, fmt, cfg.store) if fmt == "parquet" or output_path else None
    con = open_store(cfg).connect(read_only=True, as_of=parse_as_of(as_of) if as_of else None)
    result = run_read_only(con, query, timeout_s=timeout)
    if target is None:
        print_table(result, fmt)
    else:
        output.write_file(result, fmt, target)
        console.print(f"{result.num_rows} row(s) written to {target}")


@command(*CONFIG)
def compact(
    opts: Options,
    table: Annotated[str, typer.Option(help="Table to compact (default: all).")] = "all",
    run: Annotated[str | None, typer.Option("--run", help="Only this run's partitions (default: all).")] = None,
    vacuum: Annotated[bool, typer.Option("--vacuum/--no-vacuum", help="Then delete files no kept version "
                                         "needs.")] = True,
    retention_hours: Annotated[float, typer.Option(help="Vacuum keeps files removed less than this long ago "
                                                   "(at least 1: in-flight readers), and every file a recorded "
                                                   "selection read.")] = 168.0,
) -> None:
    """Merge small files per partition (Delta optimize), then vacuum. Safe while other processes write.
    Example: recpipe compact --store store"""
    from recpipe.schema import table_names
    from recpipe.store.compact import MIN_RETENTION_HOURS, maintain

    cfg = opts.build()
    names = table_names() if table == "all" else [table]
    for name in names:
        if name not in table_names():
            raise OptionError(f"--table must be one of {', '.join(table_names())} or all (got {name!r})")
    if retention_hours < MIN_RETENTION_HOURS:
        raise OptionError(f"--retention-hours must be >= {MIN_RETENTION_HOURS:g}: a query still reading files "
                         f"removed less than that ago would fail (got {retention_hours:g})")
    for name, stats, done in maintain(open_store(cfg), names, run=run, vacuum=vacuum, retention_hours=retention_hours):
        if stats["files_merged"]:
            console.print(f"{name}: {stats['files_merged']} files -> {stats['files_written']} "
                          f"in {stats['partitions']} partition(s)")
        if done and done["files_deleted"]:
            console.print(f"{name}: vacuum deleted {done['files_deleted']} file(s) "
                          f"(retention {done['retention_hours']} h)")
    console.print("compaction done")


@command(*CONFIG)
def doctor(
    opts: Options,
    repair: Annotated[bool, typer.Option("--repair", help="Quarantine bad files, remove stale temp files.")] = False,
    migrate: Annotated[bool, typer.Option("--migrate", help="Convert an archive of the old Parquet-folder format "
                                          "to Delta tables (every row verified), and record manifests of "
                                          "checkpoints written before them.")] = False,
) -> None:
    """Check the archive; exit 1 if problems remain. Example: recpipe doctor --store store --repair"""
    from recpipe.doctor import check

    cfg = opts.build()
    done = check(cfg.store, cfg.storage_options or None, fix=repair, migrate=migrate)
    if done.migrated is not None:
        for item in done.migrated["quarantined"]:
            out.print(f"[yellow]quarantined[/] {item['path']}: {item['reason']}", highlight=False)
        out.print(f"[green]migrated[/] {done.migrated['message']}", highlight=False)
    for problem in done.found.problems:
        out.print(f"[yellow]{problem.kind}[/] {problem.path}: {problem.detail}", highlight=False)
    for line in done.repaired:
        out.print(f"[green]repaired[/] {line}", highlight=False)
    out.print(f"{done.final.files_checked} files checked, {len(done.final.problems)} problem(s)")
    if not done.final.ok:
        raise typer.Exit(1)


LOOP_SUMMARY = """
SELECT r.policy_version, count(*) AS rollouts, round(avg(r.reward), 3) AS reward_mean,
       round(avg(r.reward_parts.correctness), 3) AS correct,
       (SELECT round(max(e.accuracy), 3) FROM evals e WHERE e.run = r.run AND e.policy_version = r.policy_version) AS eval_accuracy
FROM rollouts r WHERE r.run = $run GROUP BY r.run, r.policy_version ORDER BY r.policy_version
"""
STALENESS_SUMMARY = """
SELECT b.step, min(b.policy_version) AS data_version, b.step - min(b.policy_version) AS staleness,
       count(*) AS rollouts, any_value(s.applied) AS applied,
       round(any_value(s.loss), 4) AS loss, round(any_value(s.clip_fraction), 3) AS clip_fraction
FROM batches b JOIN steps s ON s.run = b.run AND s.step = b.step
WHERE b.run = $run GROUP BY b.step ORDER BY b.step
"""


def _summarise(cfg: RecpipeConfig) -> None:
    con = open_store(cfg).connect(read_only=True)
    print_table(con.sql(LOOP_SUMMARY, params={"run": cfg.run}).to_arrow_table(), title="rewards per policy version")
    print_table(con.sql(STALENESS_SUMMARY, params={"run": cfg.run}).to_arrow_table(), title="trained batches")


def _steps_done(cfg: RecpipeConfig) -> tuple[int, int, bool]:
    from recpipe.status import steps_done

    return steps_done(cfg.store, cfg.run, cfg.storage_options or None)


def _nothing_to_do(cfg: RecpipeConfig, done: int, why: str) -> None:
    """A command with no step left to train says so (it used to exit 0 silently)."""
    out.print(f"nothing to do: run {cfg.run} already has {done} step(s) ({why})", highlight=False, soft_wrap=True)


@command(*LOOP, "dry_run", long=True)
def loop(
    opts: Options,
    summary: Annotated[bool, typer.Option(help="Print the SQL summary at the end.")] = True,
    generators: Annotated[int, typer.Option(help="Generator processes beside the trainer (0: one process does "
                                            "everything in turn).")] = 0,
    generator_devices: Annotated[str | None, typer.Option(help="CPU cores (or CUDA devices) the generators share "
                                                          "out, e.g. 0,1.")] = None,
    trainer_devices: Annotated[str | None, typer.Option(help="CPU cores (or CUDA devices) of the trainer.")] = None,
    ray: Annotated[str | None, typer.Option("--ray", help="Run the --generators as Ray actors: local (a Ray "
                                            "instance for this run), auto (this machine's cluster) or ADDRESS.")]
    = None,
) -> None:
    """Run (or resume) generate -> select -> train. Example: recpipe loop --model smollm2 --steps 4 --store store

    With --generators N, N generator processes (or Ray actors, --ray) sample while the trainer trains
    (recpipe.roles)."""
    at_least("--generators", generators, 0)
    if ray is not None and not generators:
        raise OptionError("--ray runs the generators as Ray actors: give --generators N (N >= 1) too")
    if ray is not None and generator_devices:
        raise OptionError("--generator-devices places local processes; with --ray, Ray places the actors")
    cfg = opts.config()
    done, version, evaluated = _steps_done(cfg)
    if done >= cfg.loop.steps and evaluated:
        return _nothing_to_do(cfg, done, f"loop.steps={cfg.loop.steps}; give --steps {done + 1} or more to go on")
    from recpipe.progress import LoopProgress

    with LoopProgress(cfg.loop.steps, console) as progress:
        if not generators:  # the roles need no Prefect (its import alone takes seconds)
            from flows.pipeline_flows import loop as loop_flow

            loop_flow(to_params(cfg), progress=progress)
        elif ray is not None:
            from recpipe.roles import launch_ray

            launch_ray(cfg, generators, address=ray, progress=progress,
                       trainer_devices=_devices("--trainer-devices", trainer_devices))
        else:
            from recpipe.roles import launch_local

            launch_local(cfg, generators, generator_devices=_devices("--generator-devices", generator_devices),
                         trainer_devices=_devices("--trainer-devices", trainer_devices), progress=progress)
    if summary:
        _summarise(cfg)


def _devices(option: str, text: str | None) -> list[int]:
    if not text:
        return []
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise OptionError(f"{option} must be comma-separated device numbers, e.g. 0,1 (got {text!r})") from None


@command(*LOOP, long=True)
def generator(
    opts: Options,
    exit_when_idle: Annotated[bool, typer.Option(help="Stop when no shard can be generated now, instead of "
                                                 "waiting for the trainer's next version.")] = False,
) -> None:
    """A generator worker: samples the shards a run's schedule needs (the loop's settings), beside a trainer,
    on this or another machine sharing the archive. Example: recpipe generator --store s3://bucket/runs --run r1"""
    from recpipe.progress import LoopProgress
    from recpipe.recipe import LoopRecipe
    from recpipe.roles import pin_to_cpus, run_generator

    cfg = opts.config()
    pin_to_cpus()
    with LoopProgress(0, console) as progress, LoopRecipe(cfg, progress=progress, lease=None) as recipe:
        rows = run_generator(recipe, exit_when_idle=exit_when_idle)
    console.print(f"{rows} rollouts written")


@command(*LOOP, long=True)
def trainer(
    opts: Options,
    wait_timeout: Annotated[float, typer.Option(help="Seconds to wait for a step's rollouts before giving up.")]
    = 3600.0,
) -> None:
    """The trainer role: trains each step once generator workers (`recpipe generator`) committed its rollouts;
    one per run. Example: recpipe trainer --store s3://bucket/runs --run r1 --steps 20"""
    if wait_timeout <= 0:
        raise OptionError(f"--wait-timeout must be > 0 seconds (got {wait_timeout})")
    from recpipe.progress import LoopProgress
    from recpipe.recipe import LoopRecipe
    from recpipe.roles import pin_to_cpus, run_trainer

    cfg = opts.config()
    pin_to_cpus()
    with LoopProgress(cfg.loop.steps, console) as progress, LoopRecipe(cfg, progress=progress) as recipe:
        results = run_trainer(recipe, wait_timeout_s=wait_timeout)
    console.print(f"{len(results)} step(s) trained")


@command(*RUN, "model", "task", "dry_run", long=True)
def generate(
    opts: Options,
    version: Annotated[int | None, typer.Option(help="Policy version to sample from (default: latest).")] = None,
    prompts: Annotated[int | None, typer.Option(help="Groups to generate (default: select.groups_per_step).")] = None,
) -> None:
    """Generate rollouts into the archive. Example: recpipe generate --model tiny --prompts 16 --store store"""
    at_least("--prompts", prompts, 1)
    at_least("--version", version, 0)
    cfg = opts.config()
    from flows.pipeline_flows import generate as generate_flow
    from recpipe.progress import LoopProgress

    with LoopProgress(0, console) as progress:
        rows = generate_flow(to_params(cfg), version=version, prompts=prompts, progress=progress)
    console.print(f"{rows} rollouts written")


@command(*RUN)
def select(
    opts: Options,
    step: Annotated[int, typer.Option("--step", help="Training step the batch is for.")],
    query: Annotated[str | None, typer.Option("--query", help="Named query or path to a .sql file.")] = None,
    param: Annotated[list[str] | None, typer.Option("--param", help="Query parameter k=v (repeatable).")] = None,
    as_of: AsOfOpt = None,
    rerun: Annotated[bool, typer.Option("--rerun", help="Run the step's recorded selection again as of the table "
                                        "versions it read, and compare with what was recorded.")] = False,
) -> None:
    """Select and record one step's batch (with --as-of or --rerun: select on the archive as it was, record
    nothing). Example: recpipe select --store store --query schedule --step 0"""
    at_least("--step", step, 0)
    from recpipe import recipe as recipes
    from recpipe.config import apply_overrides

    params = apply_overrides({}, list(param or []))
    cfg = opts.build({"select.query": query})
    cfg.select.params = {**cfg.select.params, **params}
    if rerun and as_of:
        raise OptionError("--rerun uses the versions the step recorded; give --rerun or --as-of, not both")
    if rerun or as_of:
        from recpipe.select import replay_lineage, rerun_recorded
        from recpipe.store import parse_as_of

        st = open_store(cfg)
        batch = rerun_recorded(st, cfg.run, step) if rerun else recipes.select_as_of(st, cfg, step, parse_as_of(as_of))
        summary = recipes.batch_summary(batch)
        summary["read_versions"] = batch.read_versions
        if rerun:
            summary["same_as_recorded"] = batch.rollout_ids == replay_lineage(st, cfg.run, step).rollout_ids
    else:
        with recipes.LoopRecipe(cfg) as recipe:
            summary = recipes.batch_summary(recipe.select(step))
    for key, value in summary.items():
        out.print(f"{key}: {value}", highlight=False)


@command(*RUN, "preset_", "model", "dry_run", long=True)
def train(
    opts: Options,
    steps: Annotated[int, typer.Option("--steps", help="Steps to train (no generation).")] = 1,
    nproc: Annotated[int | None, typer.Option("--nproc", help="Trainer ranks (torchrun, FSDP2; default "
                                              "train.nproc): one per GPU, gloo on CPU.")] = None,
) -> None:
    """Train on batches selected from the archive. Example: recpipe train --store store --steps 2 --set select.query=fresh"""
    at_least("--steps", steps, 1)
    cfg = opts.config({"train.nproc": nproc})
    if cfg.train.nproc > 1 and "WORLD_SIZE" not in os.environ:  # start the ranks; rank 0 comes back here
        from recpipe.train.launch import relaunch

        code = relaunch(cfg.train.nproc, sys.argv[1:], cfg.train.devices)
        if code:
            raise typer.Exit(code)
        return
    from flows.pipeline_flows import train as train_flow
    from recpipe.progress import LoopProgress

    with LoopProgress(steps, console) as progress:
        train_flow(to_params(cfg), steps=steps, progress=progress)


@command(*RUN, "steps", "preset_", "model", "dry_run", long=True)
def retrain(
    opts: Options,
    source_run: Annotated[str | None, typer.Option("--from-run", help="Replay this run's recorded batches.")] = None,
) -> None:
    """Train a new run from archived rollouts only. Example: recpipe retrain --from-run base --run re1 --preset grpo"""
    extra: dict[str, Any] = {}
    recorded: list[int] = []
    if source_run is not None:  # given as overrides: set on the config they would not travel to the flow
        from recpipe.recipe import retrain_plan

        cfg = opts.build()
        extra, recorded = retrain_plan(cfg, source_run, steps_given=opts.given["steps"] is not None,
                                       model_given="name" in cfg.model.model_fields_set)
    cfg = opts.config(extra)
    done = _steps_done(cfg)[0]
    left = [s for s in recorded if done <= s < cfg.loop.steps] if source_run is not None else range(done, cfg.loop.steps)
    if not left:
        return _nothing_to_do(cfg, done, f"loop.steps={cfg.loop.steps}" + (
            f", run {source_run} has {len(recorded)} recorded step(s)" if source_run is not None else ""))
    from flows.pipeline_flows import retrain as retrain_flow
    from recpipe.progress import LoopProgress

    with LoopProgress(cfg.loop.steps, console) as progress:
        trained = retrain_flow(to_params(cfg), source_run=source_run, progress=progress)
    if source_run is not None:
        wanted = [s for s in recorded if s < cfg.loop.steps]
        span = f" (steps {wanted[0]}..{wanted[-1]})" if wanted else ""
        out.print(f"retrain: run {cfg.run} trained {trained} step(s) now; it replays {len(wanted)} of the "
                  f"{len(recorded)} recorded steps of run {source_run}{span}")
    _summarise(cfg)


@command(*RUN, "model", "task", long=True)
def evaluate(
    opts: Options,
    version: Annotated[int | None, typer.Option(help="Policy version (default: latest).")] = None,
) -> None:
    """Greedy held-out accuracy into `evals`. Example: recpipe evaluate --store store --version 0"""
    at_least("--version", version, 0)
    cfg = opts.config()
    from recpipe.store import Store

    if version and Store.exists(cfg.store, cfg.storage_options or None):
        from recpipe.status import require_version

        require_version(open_store(cfg), cfg.run, version)  # says so when retention removed it
    from flows.pipeline_flows import evaluate as evaluate_flow

    row = evaluate_flow(to_params(cfg), version=version)
    out.print(f"run {row['run']} v{row['policy_version']} {row['task']}: accuracy {row['accuracy']:.3f} (n={row['n']})")


@command(*CONFIG)
def report(
    opts: Options,
    runs: Annotated[list[str] | None, typer.Option("--run", help="Run name; repeat it to overlay runs "
                                                   "(default: config `run`).")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Folder for PNGs and index.html (default: <store>/reports/<run>).")] = None,
) -> None:
    """PNG plots + one HTML page for a run, or several overlaid. Example: recpipe report --store store --run a --run b"""
    from recpipe.report import write_report

    cfg = opts.build({"run": runs[0] if runs else None})
    names = runs or [cfg.run]
    st = open_store(cfg)
    path = write_report(st, names, out_dir or st.root / "reports" / "+".join(names))
    out.print(f"report written to {path}")


@command(*RUN)
def export(
    opts: Options,
    to: Annotated[Path, typer.Option("--to", help="New folder for the Hugging Face model (config, safetensors, "
                                     "tokenizer; no optimizer state).")],
    version: Annotated[int, typer.Option("--version", help="Policy version (0: the base model).")],
    dtype: Annotated[str | None, typer.Option("--dtype", help="float32 (as trained) | bfloat16 | float16.")] = None,
) -> None:
    """Write a policy version as a Hugging Face folder that from_pretrained and `vllm serve` load.
    Example: recpipe export --store store --run r1 --version 3 --to r1-v3 --dtype bfloat16"""
    at_least("--version", version, 0)
    from recpipe.export import export_version

    cfg = opts.build()
    path = export_version(open_store(cfg), cfg.run, version, to, dtype=dtype)
    out.print(f"run {cfg.run} v{version} exported to {path}", highlight=False)


@command(*CONFIG, "steps", "model", "task", long=True)
def experiment(
    opts: Options,
    presets: Annotated[str, typer.Option(help="Comma-separated loss presets, each optionally with overrides: "
                                         "rec-oneside-nois:0.6,2.0 (eps low, high), red-weight:temp=0.5.")] = "reinforce,rec-oneside-nois,grpo",
    settings: Annotated[str, typer.Option(help="Comma-separated sync settings scaled to --steps: onpolicy, sync, syncoffset, lag, offline, or k:o.")] = "onpolicy,sync,lag,offline",
    seeds: Annotated[str | None, typer.Option(help="Seeds, e.g. 0,1 or 0-3: each is the sampling and trainer seed of one run per cell (default: generate.seed).")] = None,
    eval_every: Annotated[int | None, typer.Option(help="Held-out evaluation every N steps (default: loop.eval_every).")] = None,
    workers: Annotated[int, typer.Option(help="Runs at a time, each in its own process on its share of the cores.")] = 1,
    threshold: Annotated[float, typer.Option(help="Accuracy threshold for 'steps to threshold'.")] = 0.5,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Folder for the tables and plots (default: <store>/reports/experiment).")] = None,
) -> None:
    """The paper's study in one command: presets x sync settings x seeds on one archive; a rerun of
    the same command skips finished runs. Example: recpipe experiment --model tiny --steps 6 --seeds 0,1 --store exp"""
    from recpipe.experiment import (
        experiment_configs,
        parse_presets,
        parse_seeds,
        parse_settings,
        run_experiment,
    )

    at_least("--eval-every", eval_every, 0)
    cfg = opts.build({"loop.eval_every": eval_every})
    preset_specs = parse_presets(presets)
    grid = parse_settings(settings, cfg.loop.steps)
    seed_list = parse_seeds(seeds) if seeds is not None else None
    configs = experiment_configs(cfg, preset_specs, grid, seed_list)  # validate every run before the first starts
    opts.check(cfg)
    from recpipe.progress import LoopProgress

    with LoopProgress(cfg.loop.steps * len(configs), console) as progress:
        table, path = run_experiment(cfg, preset_specs, grid, seed_list, workers=workers, threshold=threshold,
                                     out_dir=out_dir, progress=progress)
    print_table(table, title="experiment")
    out.print(f"comparison written to {path}")


@command(*CONFIG)
def serve(
    opts: Options,
    flow_name: Annotated[list[str] | None, typer.Option("--flow", help="Flow(s) to deploy: loop, generate, retrain, train, evaluate.")] = None,
    cron: Annotated[str | None, typer.Option(help="Cron schedule, e.g. '0 3 * * *' (nightly).")] = None,
    interval: Annotated[float | None, typer.Option(help="Interval schedule in seconds, e.g. 3600.")] = None,
) -> None:
    """Register and serve scheduled deployments (needs a Prefect server: see README).
    Example: recpipe serve --flow generate --interval 3600 --store store"""
    from flows import require_server

    require_server("recpipe serve")  # before the flows' imports (tens of seconds on a busy machine)
    from flows.deployments import serve_deployments

    serve_deployments(opts.build(), flow_name or ["loop"], cron=cron, interval=interval)


@command(*CONFIG)
def status(
    opts: Options,
    fmt: Annotated[str, typer.Option("--format", "-f", help="table | json (one object per run and line)")] = "table",
    run: Annotated[str | None, typer.Option("--run", help="Also print this run's resolved config, as its latest "
                                            "command saved it.")] = None,
) -> None:
    """The runs in a store: steps, versions (and those on disk), rollouts, last eval, model, lag, who holds
    the run. Example: recpipe status --store store --run r1"""
    from recpipe import output
    from recpipe.status import runs_status, table_rows

    if fmt not in ("table", "json"):
        raise OptionError(f"--format must be table or json (got {fmt!r})")
    st = open_store(opts.build())
    runs = runs_status(st)
    if fmt == "json":
        output.write_json_lines(runs, sys.stdout)
        return
    out.print(output.rich_table(table_rows(runs), title=f"runs in {st.uri}"))
    if run is not None:
        from recpipe.status import saved_run_config

        saved = saved_run_config(st, run)
        if saved is None:
            raise OptionError(f"run {run!r} has no saved config in {st.uri} (runs: "
                             f"{', '.join(runs.column('run').to_pylist()) or 'none'})")
        out.print(f"config of run {run}:", highlight=False)
        out.print(saved, end="", highlight=False, markup=False, soft_wrap=True)


def _print_version(value: bool) -> None:
    if value:
        from recpipe import __version__

        out.print(f"recpipe {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print recpipe's version and exit.")] = False,
) -> None:
    # Options before the command; the help text stays the app's.
    del version


def main() -> None:
    app()


if __name__ == "__main__":
    main()
