"""What a Ray worker does with a shipped job (no Ray import here: this is plain Python run on the worker).

``run_shipped`` gets the pickled plan (shared by every task of a build), the
pickled job without it, and ``WorkerOptions``; it returns a pickled
``Shipped`` (the kind's result, with the driver's paths) or ``Failed`` (a
one-paragraph message naming the target), never raising for a failure of the
build itself, so no Ray traceback ever reaches a user. A KeyboardInterrupt
(Ray's cancel) is not caught: the writers unwind, removing their temp files.

With a store (execute/remote_store.py) the worker never needs the driver's
paths: each file the target reads is used in place when this machine has
that path with that sha256, else fetched from the store into the local
content-addressed store; the output (and a merge or extraction report) is
written into a private scratch folder, uploaded under its sha256 and removed;
the driver downloads it. The target is run with its paths rewritten
(``remap``), and the result is returned with the driver's paths.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import socket
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path, PurePath

from loraforge import __version__
from loraforge.errors import LoraforgeError
from loraforge.execute.job import BuildJob, dumps, loads

SCRATCH_PREFIX = "loraforge-ray-"
# Test hooks, read by the driver and handed to the worker in WorkerOptions (tests/test_ray_executor.py only):
KILL_ENV = "LORAFORGE_TEST_RAY_KILL"  # "<target>:<times>:<folder>": the worker dies (os._exit) mid-write that many times
HIDE_ENV = "LORAFORGE_TEST_RAY_HIDE"  # "<folder>": the worker cannot open files below it (the driver's files, elsewhere)
STALL_ENV = "LORAFORGE_TEST_RAY_STALL"  # "<target>:<seconds>": the worker waits that long mid-write (to be cancelled)


@dataclass(frozen=True)
class WorkerOptions:
    device: str  # the torch device string this worker computes on ("cpu", "cuda" = the GPU Ray assigned)
    cpu_threads: int
    version: str  # the driver's loraforge version: action keys and bytes depend on it
    store: object | None = None  # execute/remote_store.py RemoteStore, or None: the driver's filesystem is shared
    environment: dict | None = None  # the driver's numeric environment for targets whose bytes depend on it
    kill: str | None = None  # test hook (KILL_ENV)
    hide: str | None = None  # test hook (HIDE_ENV)
    stall: str | None = None  # test hook (STALL_ENV)


@dataclass(frozen=True)
class Upload:
    """A file the worker put in the store, for the driver to download to ``path``."""

    path: Path  # the driver's path
    sha256: str
    size: int


@dataclass(frozen=True)
class Shipped:
    result: object  # the kind's result, paths as the driver knows them
    uploads: tuple[Upload, ...]
    host: str
    seconds: float
    fetched: tuple[str, ...] = ()  # names of the read files fetched from the store


@dataclass(frozen=True)
class Failed:
    target: str
    message: str  # one paragraph
    error: LoraforgeError | None = None  # the original error, when it is one of loraforge's


_plans: dict[str, object] = {}  # plan id -> plan: the last one unpickled in this worker process


def run_shipped(plan_id: str, plan_bytes: bytes, job_bytes: bytes, options: WorkerOptions) -> bytes:
    """Run one shipped job on this worker; returns a pickled Shipped or Failed."""
    started = time.perf_counter()
    job: BuildJob = loads(job_bytes)
    name = job.target.name
    try:
        if options.version != __version__:
            return dumps(Failed(name, (
                f"target '{name}' was not built: this Ray worker ({socket.gethostname()}) runs loraforge "
                f"{__version__}, the driver {options.version}; action keys and bytes depend on the version. Install "
                "the same loraforge version on every node (pip install 'loraforge[ray]==<version>').")))
        plan = _plans.get(plan_id)
        if plan is None:
            plan = loads(plan_bytes)
            _plans.clear()
            _plans[plan_id] = plan
        job = job.with_plan(plan)
        _check_environment(job, options)
        if options.hide:
            _hide(options.hide)
        outcome = _run(job, options)
        return dumps(dataclasses.replace(outcome, seconds=time.perf_counter() - started))
    except LoraforgeError as error:
        return dumps(Failed(name, str(error), _picklable(error)))
    except Exception as error:  # a bug: one paragraph here, the traceback from a local build
        return dumps(Failed(name, (
            f"target '{name}' failed on the Ray worker {socket.gethostname()} with an unexpected "
            f"{type(error).__name__}: {error}. This is a bug in loraforge; the same build without --executor ray "
            "runs the same code and shows where it happened.")))
    finally:
        _hidden.clear()


def _run(job: BuildJob, options: WorkerOptions) -> Shipped:
    from loraforge.execute.device import select_device
    from loraforge.execute.resources import Resources

    resources = Resources(select_device(options.device), max(1, options.cpu_threads))
    progress = _test_hooks(job.name, options)
    if options.store is None:  # one filesystem: read and write the driver's paths in place
        return Shipped(job.run(resources, progress), (), socket.gethostname(), 0.0)
    _remove_stale_scratch()
    scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))
    try:
        mapping, fetched = _inputs(job, options.store)
        outputs = _outputs(job.target, scratch)
        mapping.update(outputs)
        result = dataclasses.replace(job, target=remap(job.target, mapping)).run(resources, progress)
        uploads = []
        for driver_path, local in outputs.items():
            if not local.exists():
                continue
            sha256 = _written_sha256(result, local)
            options.store.upload(local, sha256)
            uploads.append(Upload(driver_path, sha256, local.stat().st_size))
        back = {local: driver_path for driver_path, local in outputs.items()}
        return Shipped(remap(result, back), tuple(uploads), socket.gethostname(), 0.0, fetched)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _remove_stale_scratch() -> None:
    """Scratch folders of workers that died (killed mid-task): their pid is in the name (loraforge/atomic.py's rule)."""
    from loraforge.atomic import owner_alive

    folder = Path(tempfile.gettempdir())
    try:
        names = [name for name in os.listdir(folder) if name.startswith(SCRATCH_PREFIX)]
    except OSError:
        return
    for name in names:
        pid = name[len(SCRATCH_PREFIX):].split("-", 1)[0]
        path = folder / name
        if pid.isdigit() and not owner_alive(int(pid)) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


def _inputs(job: BuildJob, store) -> tuple[dict[Path, Path], tuple[str, ...]]:
    """Driver path -> the file to read here: the same path when it holds those bytes, else a fetched copy."""
    from loraforge.resolve.hash_cache import cached_file_sha256

    mapping, fetched = {}, []
    for read in job.reads:
        try:
            with open(read.path, "rb"):  # another machine: usually not there at all
                pass
            if cached_file_sha256(read.path) == read.sha256:
                continue  # this machine sees the driver's file, with the bytes the target reads
        except OSError:
            pass
        mapping[read.path] = store.fetch_into_local_store(read.sha256, f"'{read.name}' (read by target '{job.name}')")
        fetched.append(read.name)
    return mapping, tuple(fetched)


def _outputs(target, scratch: Path) -> dict[Path, Path]:
    """The target's output and report paths -> where this worker writes them."""
    outputs = {Path(target.output): scratch / Path(target.output).name}
    if target.report_path is not None:
        outputs[Path(target.report_path)] = scratch / Path(target.report_path).name
    return outputs


def _written_sha256(result, local: Path) -> str:
    written = result.written
    if Path(written.path) == local:
        return written.sha256  # the writer hashed it as it wrote
    from loraforge.formats.hashing import file_sha256

    return file_sha256(local)


def remap(value, mapping: dict):
    """``value`` with every Path found in ``mapping`` replaced, through dataclasses, tuples, lists and mappings.

    Frozen dataclasses are copied with the changed fields set (no __init__ or
    __post_init__ runs again); what holds no mapped path is returned as it is.
    """
    if not mapping:
        return value
    return _remap(value, mapping, {})


def _remap(value, mapping, seen):
    if isinstance(value, PurePath):
        return mapping.get(value, value)
    if isinstance(value, (str, bytes, int, float, bool, type(None))):
        return value
    key = id(value)
    if key in seen:
        return seen[key]
    seen[key] = value
    new = value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {}
        for f in dataclasses.fields(value):
            old = getattr(value, f.name)
            updated = _remap(old, mapping, seen)
            if updated is not old:
                changes[f.name] = updated
        if changes:
            new = copy.copy(value)
            for name, updated in changes.items():
                object.__setattr__(new, name, updated)
    elif isinstance(value, (tuple, list)):
        items = [_remap(item, mapping, seen) for item in value]
        if any(a is not b for a, b in zip(items, value)):
            new = type(value)(items) if type(value) in (tuple, list) else type(value)(*items)
    elif isinstance(value, (dict, types.MappingProxyType)):
        items = {k: _remap(v, mapping, seen) for k, v in value.items()}
        if any(items[k] is not v for k, v in value.items()):
            new = types.MappingProxyType(items) if isinstance(value, types.MappingProxyType) else type(value)(items)
    seen[key] = new
    return new


def _check_environment(job: BuildJob, options: WorkerOptions) -> None:
    """Targets whose bytes depend on the numeric environment must run in the one the driver records in the lock."""
    if options.environment is None:
        return
    from loraforge.errors import BuildError
    from loraforge.plan.numeric_environment import NumericEnvironment, target_environment

    here = target_environment(job.target)
    driver = NumericEnvironment.from_json(options.environment)
    if driver is not None and here != driver:
        raise BuildError(
            f"target '{job.name}' was not built on the Ray worker {socket.gethostname()}: its SVD step's bytes depend "
            f"on the numeric environment, and this worker's differs from the driver's ({'; '.join(here.differences(driver))}), "
            "which the lock would record. Run SVD targets on workers like the driver (same torch, BLAS and CPU kind), "
            "or build them without --executor ray."
        )


def _test_hooks(name: str, options: WorkerOptions):
    """The worker's progress callback: nothing, or the test hooks that kill or stall this target mid-write."""
    kill = options.kill.split(":", 2) if options.kill else None
    stall = options.stall.split(":", 1) if options.stall else None
    kill = kill if kill and kill[0] == name else None
    stall = stall if stall and stall[0] == name else None
    if kill is None and stall is None:
        return lambda nbytes: None
    state = {"checked": False}

    def on_progress(nbytes: int) -> None:
        if state["checked"]:
            return
        state["checked"] = True
        if kill is not None:
            attempts = Path(kill[2])
            attempts.mkdir(parents=True, exist_ok=True)
            count = len(list(attempts.glob("attempt-*"))) + 1
            (attempts / f"attempt-{count}-{os.getpid()}").touch()
            if count <= int(kill[1]):
                os._exit(1)  # as SIGKILL or the OOM killer would: no cleanup, no exception
        if stall is not None:
            deadline = time.monotonic() + float(stall[1])
            while time.monotonic() < deadline:  # short sleeps: Ray's cancel (KeyboardInterrupt) lands between them
                time.sleep(0.05)

    return on_progress


_hidden: list[str] = []
_hook_installed = False


def _hide(folder: str) -> None:
    """Test hook: while this job runs, opening any file below ``folder`` fails as on a machine without it."""
    global _hook_installed
    _hidden[:] = [os.path.realpath(folder)]
    if not _hook_installed:
        sys.addaudithook(_audit)
        _hook_installed = True


def _audit(event: str, args) -> None:
    if event != "open" or not _hidden or not args or isinstance(args[0], int):
        return
    path = os.fsdecode(args[0]) if isinstance(args[0], (str, bytes, os.PathLike)) else None
    if path is not None and os.path.realpath(path).startswith(_hidden[0] + os.sep):
        raise FileNotFoundError(2, "not visible on this worker (test hook)", path)


def _picklable(error: LoraforgeError) -> LoraforgeError | None:
    try:
        loads(dumps(error))
    except Exception:  # an error type that does not pickle: the driver reports its message as a BuildError
        return None
    return error
