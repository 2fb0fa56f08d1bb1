"""The Ray executor (`build --executor ray [--address ADDR] [--store URL]`): each ready target as a Ray task.

Imported only when a build asks for Ray; a local build never imports ray
(tests/test_ray_executor.py checks it). The driver (this process) keeps the
build's order: a target is prepared (planned again from its producers' real
outputs, checked against the lock) and submitted only once every target it
reads has finished, and its result is finished (lock entry written) here, by
the driver alone, in plan order among the results that arrive together.

A task is the target's ``BuildJob`` (execute/job.py), pickled, next to one
shared copy of the plan in Ray's object store; the worker runs it with
execute/remote_job.py. Ray resources: ``memory`` = the target's memory
estimate (at most the largest node's memory, so one target can always run,
as with ``--jobs``), ``num_cpus`` = ``cpus_per_target``, ``num_gpus`` = 1 when
the target computes on CUDA (`device: cuda`, or auto on a driver with a GPU);
a CPU target gets no GPU, so ``auto`` cannot drift to a GPU on a worker.

Files: without a store the workers share the driver's filesystem (one
machine, or an NFS mount at the same path) and write outputs in place; with
one (execute/remote_store.py) every file travels through it by sha256.

Failures: an error in a worker comes back as the one-paragraph error naming
the target; a worker that dies (killed, out of memory, its node lost) is
retried once by Ray (``max_retries``) and, if it dies again, reported naming
the target. Either way the running tasks are cancelled (their writers remove
their temp files), the ones that finished anyway are recorded, and the first
failure in plan order is raised; Ctrl-C cancels the outstanding tasks the
same way. The lock keeps every target that finished.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from typing import Callable

from loraforge import __version__
from loraforge.errors import BuildError, LoraforgeError, UsageError
from loraforge.execute.job import BuildJob, dumps, loads
from loraforge.execute.remote_job import HIDE_ENV, KILL_ENV, STALL_ENV, Failed, Shipped, WorkerOptions, run_shipped
from loraforge.execute.remote_store import RemoteStore

POLL_SECONDS = 0.2  # how often the driver wakes while waiting, so Ctrl-C is handled promptly
CANCEL_WAIT_SECONDS = 60  # how long cancelled tasks get to unwind (remove their temp files)
LOCAL_OBJECT_STORE = 200 << 20  # a Ray instance started here holds only the plan: keep its shared memory small

RAY_MISSING = (
    "--executor ray needs Ray, which is not installed in this environment: install the extra with "
    "pip install 'loraforge[ray]' (on the driver and on every worker node), or build without --executor ray "
    "(the local executor, same outputs)."
)


def import_ray():
    """The ray module, or the one-paragraph error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UsageError(RAY_MISSING) from None
    return ray


@dataclass
class RayExecutor:
    """Targets as Ray tasks on the cluster at ``address`` (None: a Ray instance started on this machine for
    the build, or the one this process already joined; "auto": the cluster `ray start` runs on this machine)."""

    address: str | None = None
    device: str | None = None  # the command line's --device, over each target's own
    store: str | None = None  # fsspec URL of a store every node reaches; None: the driver's filesystem is shared
    cpus_per_target: float = 1
    max_retries: int = 1  # Ray re-runs a task whose worker died this many times
    log: Callable[[str], None] | None = None  # a line per target started / finished
    init_options: dict = field(default_factory=dict)  # more ray.init arguments (a local instance's num_cpus, say)
    submitted: list[str] = field(default_factory=list)  # every target submitted, in order (tests count them)
    requests: dict[str, dict] = field(default_factory=dict)  # target -> the Ray resources its task asked for

    def execute(self, order, dependencies, prepare, finish, progress=None) -> None:
        ray = import_ray()
        build = _RayBuild(self, ray, order, dependencies, prepare, finish, progress)
        try:
            build.run()
        finally:
            if build.started_here:
                ray.shutdown()


def _init(ray, address: str | None, options: dict) -> None:
    import logging

    arguments = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR, **options}
    if address is None and not os.environ.get("RAY_ADDRESS"):  # starting an instance here, not joining one
        arguments.setdefault("object_store_memory", LOCAL_OBJECT_STORE)
    try:
        ray.init(address=address, **arguments)
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise BuildError(
            f"cannot start or join {where}: {str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}. "
            "Start the cluster first (ray start --head on the head node, ray start --address HEAD:6379 on the others) "
            "and pass --address HEAD:6379 (or --address auto on a node of it); without --address a local instance is started."
        ) from None


class _RayBuild:
    def __init__(self, executor: RayExecutor, ray, order, dependencies, prepare, finish, progress):
        self.executor, self.ray = executor, ray
        self.order, self.dependencies = list(order), dependencies
        self.prepare, self.finish, self.progress = prepare, finish, progress
        self.waiting = list(order)
        self.done: set[str] = set()
        self.running: dict = {}  # ObjectRef -> (job, progress callback, time submitted)
        self.failures: dict[str, LoraforgeError] = {}
        self.store = RemoteStore(executor.store) if executor.store else None
        self.plans: dict[int, tuple[str, object]] = {}  # id(plan) -> (plan id, ObjectRef of its bytes)
        self.remote, self.nodes = None, []
        self.started_here = False
        self.test_kill, self.test_hide, self.test_stall = (os.environ.get(e) for e in (KILL_ENV, HIDE_ENV, STALL_ENV))

    def _connect(self) -> None:
        """Join (or start) Ray when the first task is submitted: a build with nothing to do never starts it."""
        if self.remote is not None:
            return
        if not self.ray.is_initialized():
            _init(self.ray, self.executor.address, self.executor.init_options)
            self.started_here = True
        self.remote = self.ray.remote(run_shipped)
        self.nodes = _node_resources(self.ray)
        self._log(f"Ray: {_describe(self.nodes)}" + (f"; store {self.store.url}" if self.store else ""))

    def run(self) -> None:
        try:
            while (self.waiting or self.running) and not self.failures:
                self._prepare_ready()
                if not self.running:
                    continue
                refs = list(self.running)
                ready, _ = self.ray.wait(refs, num_returns=1, timeout=POLL_SECONDS)
                if ready:
                    ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
                    self._collect(ready)
        except BaseException:
            self._drain()
            raise
        if self.failures:
            self._drain()
            raise self.failures[min(self.failures, key=self.order.index)]

    # --- submitting ------------------------------------------------------------

    def _prepare_ready(self) -> None:
        progressed = True
        while progressed and not self.failures:
            progressed = False
            for name in list(self.waiting):
                if all(dep in self.done for dep in self.dependencies.get(name, ())):
                    self.waiting.remove(name)
                    job = self.prepare(name)
                    if job is None:
                        self.done.add(name)
                        progressed = True  # its readers may be ready now
                    elif self.store is not None and job.target.produces == "bundle":
                        self._run_here(job)  # a release folder is assembled where its outputs are: the driver
                        progressed = True
                    else:
                        self._submit(job)
                    if self.failures:
                        return

    def _submit(self, job: BuildJob) -> None:
        from loraforge.plan.device_class import device_class

        self._connect()
        name = job.name
        gpu = device_class(self.executor.device or job.device) == "cuda"
        if gpu and not any(node.get("GPU", 0) >= 1 for node in self.nodes):
            self.failures[name] = BuildError(
                f"target '{name}' computes on CUDA (device: {self.executor.device or job.device}), but no node of the "
                "Ray cluster has a GPU. Start GPU workers (ray start --num-gpus N ...), or build it with --device cpu "
                "(targets whose bytes depend on the device class then have other action keys)."
            )
            return
        if self.store is not None:
            for read in job.reads:  # every file it reads, in the store before the task can look for it
                self.store.upload(read.path, read.sha256)
        plan_id, plan_ref = self._plan(job)
        options = WorkerOptions(
            device="cuda" if gpu else "cpu",
            cpu_threads=max(1, int(self._cpus())),
            version=__version__,
            store=self.store,
            environment=_environment(job),
            kill=self.test_kill,
            hide=self.test_hide,
            stall=self.test_stall,
        )
        resources = {"num_cpus": self._cpus(), "num_gpus": 1 if gpu else 0}
        memory = min(job.memory_bytes, max((node.get("memory", 0) for node in self.nodes), default=0))
        if memory > 0:
            resources["memory"] = int(memory)
        ref = self.remote.options(
            **resources, max_retries=self.executor.max_retries, retry_exceptions=False, name=f"loraforge {name}"
        ).remote(plan_id, plan_ref, dumps(job.without_plan()), options)
        callback = self.progress(job.target) if self.progress else None
        self.running[ref] = (job, callback, time.perf_counter())
        self.executor.submitted.append(name)
        self.executor.requests[name] = resources
        self._log(f"started {name} ({job.target.kind}) as a Ray task")

    def _cpus(self) -> float:
        largest = max((node.get("CPU", 0) for node in self.nodes), default=0)
        return min(self.executor.cpus_per_target, largest) if largest else self.executor.cpus_per_target

    def _plan(self, job: BuildJob) -> tuple[str, object]:
        """The plan's id and its bytes in Ray's object store: put once per build, shared by every task."""
        key = id(job.plan)
        if key not in self.plans:
            data = dumps(job.plan)
            self.plans[key] = (hashlib.sha256(data).hexdigest()[:24], self.ray.put(data))
        return self.plans[key]

    def _run_here(self, job: BuildJob) -> None:
        from loraforge.execute.device import select_device
        from loraforge.execute.resources import Resources

        self._log(f"started {job.name} ({job.target.kind}) in the driver")
        callback = self.progress(job.target) if self.progress else (lambda nbytes: None)
        try:
            result = job.run(Resources.local(select_device("cpu")), callback)
        except LoraforgeError as error:
            self.failures[job.name] = error
            return
        self.finish(job, result)
        self.done.add(job.name)
        self._log(f"finished {job.name}")

    # --- collecting ------------------------------------------------------------

    def _collect(self, ready) -> None:
        for ref in sorted(ready, key=lambda r: self.order.index(self.running[r][0].name)):
            job, callback, submitted = self.running.pop(ref)
            try:
                outcome = self._outcome(ref, job)
                if isinstance(outcome, Failed):
                    raise _failure(outcome)
                self._download(job, outcome)
            except LoraforgeError as error:
                self.failures[job.name] = error
                self._log(f"failed {job.name}")
                continue
            if callback is not None:
                callback(job.target.write_bytes)  # the bar's total: done
            self.finish(job, outcome.result)
            self.done.add(job.name)
            fetched = f"; fetched {', '.join(outcome.fetched)} from the store" if outcome.fetched else ""
            self._log(f"finished {job.name} on {outcome.host} in {outcome.seconds:.1f} s "
                      f"({time.perf_counter() - submitted:.1f} s after submission){fetched}")

    def _outcome(self, ref, job: BuildJob, timeout: float | None = None):
        exceptions = self.ray.exceptions
        try:
            return loads(self.ray.get(ref, timeout=timeout))
        except (exceptions.WorkerCrashedError, exceptions.NodeDiedError, exceptions.OutOfMemoryError,
                exceptions.ObjectLostError) as error:
            tries = self.executor.max_retries + 1
            raise BuildError(
                f"target '{job.name}' was not built: its Ray worker died {tries} time{'s' if tries > 1 else ''} "
                f"({'Ray retried it ' + str(self.executor.max_retries) + ' time' + ('s' if self.executor.max_retries > 1 else '') + '; ' if tries > 1 else ''}"
                f"{type(error).__name__}: the process was killed, ran out of memory or lost its node). Targets that "
                "finished are kept and in the lock; build again to retry the rest, or give the workers more memory "
                "(the target's estimate is in loraforge plan --json)."
            ) from None
        except exceptions.TaskCancelledError:
            raise
        except exceptions.RayTaskError as error:  # the task could not start its function (e.g. loraforge missing there)
            cause = getattr(error, "cause", None) or error
            raise BuildError(
                f"target '{job.name}' could not run on a Ray worker: {type(cause).__name__}: "
                f"{str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}. Every node needs the same "
                f"loraforge ({__version__}) installed with its [ray] extra."
            ) from None
        except exceptions.GetTimeoutError:
            raise
        except exceptions.RayError as error:
            raise BuildError(f"target '{job.name}' was not built: Ray reported {type(error).__name__}: "
                             f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}. Build again to retry it.") from None

    def _download(self, job: BuildJob, outcome: Shipped) -> None:
        """With a store: the worker's output (and report) into the driver's paths, verified, atomically."""
        for upload in outcome.uploads:
            upload.path.parent.mkdir(parents=True, exist_ok=True)
            size = self.store.download(upload.sha256, upload.path, f"the output of target '{job.name}'")
            if size != upload.size:
                raise BuildError(f"the output of target '{job.name}' came back with {size} bytes, not {upload.size}. Build again.")

    def _drain(self) -> None:
        """Cancel what still runs; record the ones that finished anyway; keep real failures."""
        if not self.running:
            return
        for ref in self.running:
            try:
                self.ray.cancel(ref)
            except Exception:  # noqa: BLE001  (already finished, or the cluster is gone)
                pass
        deadline = time.monotonic() + CANCEL_WAIT_SECONDS
        for ref in sorted(self.running, key=lambda r: self.order.index(self.running[r][0].name)):
            job, callback, _submitted = self.running[ref]
            try:
                outcome = self._outcome(ref, job, timeout=max(0.1, deadline - time.monotonic()))
                if isinstance(outcome, Failed):
                    raise _failure(outcome)
                self._download(job, outcome)
            except (self.ray.exceptions.TaskCancelledError, self.ray.exceptions.GetTimeoutError):
                self._force_cancel(ref)
                continue
            except LoraforgeError as error:
                self.failures.setdefault(job.name, error)
                continue
            except BaseException:  # a second Ctrl-C: stop waiting
                self._force_cancel(ref)
                continue
            if callback is not None:
                callback(job.target.write_bytes)  # the bar's total: done
            self.finish(job, outcome.result)
        self.running.clear()

    def _force_cancel(self, ref) -> None:
        try:
            self.ray.cancel(ref, force=True)
        except Exception:  # noqa: BLE001
            pass

    def _log(self, line: str) -> None:
        if self.executor.log is not None:
            self.executor.log(line)


def _failure(outcome: Failed) -> LoraforgeError:
    """The worker's error as the driver raises it: its own type where it pickled, naming the target."""
    error = outcome.error
    message = outcome.message
    if f"'{outcome.target}'" not in message and outcome.target not in message:
        message = f"target '{outcome.target}': {message}"
    if error is not None and str(error) == message:
        return error
    try:
        return type(error)(message) if error is not None else BuildError(message)
    except Exception:  # noqa: BLE001  (an error type with another constructor)
        return BuildError(message)


def _environment(job: BuildJob) -> dict | None:
    if job.target.device_class is None:
        return None
    from loraforge.plan.numeric_environment import target_environment

    return target_environment(job.target).to_json()


def _describe(nodes: list[dict]) -> str:
    cpus, gpus = sum(n.get("CPU", 0) for n in nodes), sum(n.get("GPU", 0) for n in nodes)
    memory = sum(n.get("memory", 0) for n in nodes) / (1 << 30)
    return f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}, {cpus:g} CPUs, {gpus:g} GPUs, {memory:.1f} GiB memory for tasks"


def _node_resources(ray) -> list[dict]:
    """Each live node's total resources (CPU, GPU, memory)."""
    try:
        return [dict(node.get("Resources", {})) for node in ray.nodes() if node.get("Alive")]
    except Exception:  # noqa: BLE001  (an older Ray without nodes(): assume one node with what the cluster has)
        return [dict(ray.cluster_resources())]
