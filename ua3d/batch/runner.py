"""Run a task over many items on a local process pool or on Ray, resumably.

Flow of :func:`run`
-------------------
1. **Plan** (driver): every item's options are resolved and checked, its inputs fingerprinted, its
   config hash computed (:mod:`ua3d.batch.store`). Items whose sidecar shows the same hash and whose
   outputs are in place are *skipped* (unless ``force``); items with a missing input or a bad option
   are *failed* right away with the reason; the rest are *to run*. ``dry_run`` stops here.
2. **Execute**: :func:`execute_item` -- the same function on both engines -- runs one item in a worker:
   it seeds torch, sets the worker's threads, calls the task function on temporary output paths, moves
   each output into place, then writes the sidecar. It never raises for a bad item: the error comes
   back as a result and the run goes on; nothing already written is touched.
3. **Engines** (no scheduler of our own: the engine schedules):
   * ``local``: :class:`concurrent.futures.ProcessPoolExecutor` (``spawn``) with ``workers``
     processes of ``threads`` torch threads each (default ``threads = cores // workers``, so
     ``workers x threads <= cores``); results are taken as they complete. As with any ``spawn`` pool,
     a script calling :func:`run` needs the ``if __name__ == "__main__":`` guard.
   * ``ray``: the same function as a Ray remote task with ``num_cpus = threads``; results are
     streamed back with ``ray.wait`` as they finish. ``address=None`` starts a local instance with
     ``workers x threads`` CPUs; ``"auto"`` or ``"HOST:PORT"`` joins a running cluster (where the
     output folder must be on storage every node sees).
4. **Summary**: done / skipped / failed (with the path and error of each failure), written to
   ``<out>/_batch_summary.json``; :attr:`BatchSummary.ok` is False if anything failed.

An interrupt (Ctrl-C, or SIGTERM through the CLI) cancels what has not started and stops the workers;
items already written stay valid, half-written outputs are only temporary files (removed by the
next run), so a rerun picks up exactly the items that are not done.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import store
from .items import Item, discover, read_manifest
from .tasks import Task, get_task

__all__ = ["ENGINES", "BatchSummary", "available_cores", "execute_item", "plan", "run"]

ENGINES = ("local", "ray")
SUMMARY_NAME = "_batch_summary.json"


def available_cores() -> int:
    """CPU cores this process may use (``sched_getaffinity`` where available)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class BatchSummary:
    """What a run did. ``failed`` holds ``{"id", "path", "error"}`` dicts; ``results`` per-item records."""

    task: str
    out: str
    engine: str
    workers: int | None
    threads: int
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    planned: list[str] = field(default_factory=list)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    wall_s: float = 0.0
    dry_run: bool = False
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed and not self.interrupted

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "out": self.out,
            "engine": self.engine,
            "workers": self.workers,
            "threads": self.threads,
            "done": self.done,
            "skipped": self.skipped,
            "failed": self.failed,
            "planned": self.planned,
            "wall_s": self.wall_s,
            "dry_run": self.dry_run,
            "interrupted": self.interrupted,
            "results": self.results,
            "counts": {"done": len(self.done), "skipped": len(self.skipped), "failed": len(self.failed)},
        }

    def text(self) -> str:
        """A few lines for the terminal: counts, then one line per failure."""
        if self.dry_run:
            return f"dry run: {len(self.planned)} to run, {len(self.skipped)} already done, {len(self.failed)} invalid"
        lines = [
            f"{self.task}: {len(self.done)} done, {len(self.skipped)} skipped (already done), "
            f"{len(self.failed)} failed in {self.wall_s:.1f} s ({self.engine}, {self.workers or 'cluster'} worker(s) x "
            f"{self.threads} thread(s))" + (" -- interrupted" if self.interrupted else "")
        ]
        lines += [f"  FAILED {f['id']}: {f['path']}: {f['error']}" for f in self.failed]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- worker side
_THREADS: int | None = None


def _set_threads(threads: int) -> None:
    global _THREADS
    if _THREADS != threads:
        import torch

        torch.set_num_threads(threads)  # also the numba engine's pool size (ua3d.core.fast.num_threads)
        _THREADS = threads


def worker_env(threads: int) -> dict[str, str]:
    """Environment of a worker process: OpenMP sized to ``threads`` and, unless the user set a policy,
    ``OMP_WAIT_POLICY=PASSIVE``. Idle OpenMP threads that spin compete with the numba engine's own
    thread pool: measured under load on 2 cores, one 456x368 depth-SR item with 2 threads took 2.9 s
    with spinning OpenMP threads and 0.26 s with passive ones (1 thread: 0.27 s). OpenMP reads these
    when torch loads, so they are set before a worker process starts (local pool, Ray runtime_env)."""
    return {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
    }


@contextlib.contextmanager
def _environ(env: dict[str, str]) -> Iterator[None]:
    """Set ``env`` in this process while worker processes are spawned (they inherit it)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _fast_exit() -> None:
    """Last step of a local worker process: skip the interpreter teardown (measured: 1.7-2.5 s for a
    process that imported torch, on the loaded 2-core machine; 0.06 s with this). By then the pool has
    told the worker to stop, every result was sent and every output renamed into place."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


def _init_local_worker(threads: int) -> None:
    """Local pool initializer: die with the driver (Linux), fix the thread count, exit fast when done."""
    import atexit

    atexit.register(_fast_exit)  # registered last, so it runs first
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        except OSError:  # pragma: no cover
            pass
    _set_threads(threads)


def _error_path(exc: BaseException, inputs: dict[str, str]) -> str:
    msg = str(exc)
    for p in inputs.values():
        if p and p in msg:
            return p
    return next(iter(inputs.values()), "")


def execute_item(task: Task, spec: dict[str, Any]) -> dict[str, Any]:
    """Run one planned item (see the module docstring); returns its result record, never raises on bad input.

    ``spec`` holds ``id``, ``inputs`` ({kind: path}), ``options``, ``outputs`` ({name: final path}),
    ``sidecar``, ``config_hash``, ``threads`` and ``engine``.
    """
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    wall_start = time.time()
    item_id, inputs = spec["id"], spec["inputs"]
    try:
        import torch

        _set_threads(spec["threads"])
        torch.manual_seed(spec["options"].get("seed") or 0)
        finals = {k: Path(v) for k, v in spec["outputs"].items()}
        tmps = {k: store.tmp_name(p) for k, p in finals.items()}
        for p in finals.values():
            p.parent.mkdir(parents=True, exist_ok=True)
        try:
            res = task.fn(dict(inputs), dict(spec["options"]), dict(tmps)) or {}
            missing = [k for k, p in tmps.items() if not p.is_file()]
            if missing:
                raise RuntimeError(f"task {task.name!r} did not write output(s) {missing}")
            t_written = time.perf_counter()
            outputs = {}
            for k, tmp in tmps.items():
                outputs[k] = {
                    "path": str(finals[k]),
                    "bytes": tmp.stat().st_size,
                    "sha256": store.file_sha256(tmp),
                }
                os.replace(tmp, finals[k])
        finally:
            for tmp in tmps.values():
                tmp.unlink(missing_ok=True)
        total = time.perf_counter() - t_start
        record = {
            "status": "done",
            "task": task.name,
            "task_version": task.version,
            "id": item_id,
            "config_hash": spec["config_hash"],
            "options": spec["options"],
            "inputs": spec["fingerprints"],
            "outputs": outputs,
            "metrics": res.get("metrics"),
            "info": res.get("info"),
            "timings": {
                "compute_s": res.get("compute_s"),
                "task_s": t_written - t_start,
                "total_s": total,
                "cpu_s": time.process_time() - cpu_start,  # all threads of this process
            },
            "versions": store.versions(),
            "threads": spec["threads"],
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "engine": spec["engine"],
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": wall_start,
            "finished_at": time.time(),
        }
        store.write_json_atomic(spec["sidecar"], record)
        return {
            "id": item_id,
            "status": "done",
            "seconds": time.perf_counter() - t_start,
            "compute_s": res.get("compute_s"),
            "metrics": res.get("metrics"),
            "pid": os.getpid(),
            "finished_at": time.time(),
        }
    except Exception as e:  # noqa: BLE001 - one bad item must not stop the run: its error is the result
        return {
            "id": item_id,
            "status": "failed",
            "path": _error_path(e, inputs),
            "error": f"{type(e).__name__}: {e}".splitlines()[0],
            "seconds": time.perf_counter() - t_start,
            "traceback": traceback.format_exc(limit=6),
            "pid": os.getpid(),
            "finished_at": time.time(),
        }


# ---------------------------------------------------------------------------------------------- planning
def _as_items(task: Task, items: Any) -> list[Item]:
    if isinstance(items, (str, os.PathLike)):
        return read_manifest(items, task.input_kinds)
    if isinstance(items, dict):
        return discover(items)
    items = list(items)
    bad = [type(x).__name__ for x in items if not isinstance(x, Item)]
    if bad:
        raise ValueError(f"items must be Item objects, a manifest path or a dict of globs; got {bad[0]}")
    ids = [x.id for x in items]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"duplicate item ids: {dup[:5]}")
    return items


def plan(
    task: Task,
    items: list[Item],
    out: Path,
    options: dict[str, Any],
    shared_inputs: dict[str, str],
    force: bool,
    threads: int,
    engine: str,
) -> tuple[list[dict[str, Any]], list[str], list[dict[str, str]]]:
    """Split items into (specs to run, ids already done, failures found before running)."""
    todo, skipped, failed = [], [], []
    for it in items:
        inputs = {
            **{k: v for k, v in shared_inputs.items() if v},
            **{k: v for k, v in it.inputs.items() if v},
        }
        try:
            unknown = sorted(set(inputs) - set(task.input_kinds))
            if unknown:
                raise ValueError(
                    f"unknown input kind(s) {unknown} for task {task.name!r}; known: {task.input_kinds}"
                )
            missing = [k for k in task.inputs if k not in inputs]
            if missing:
                raise ValueError(f"no {' / '.join(missing)} input for this item ({it.source or 'item'})")
            opts = task.resolve_options(options, it.options)
            prints = {}
            for k, p in inputs.items():
                if not Path(p).exists():
                    raise FileNotFoundError(f"{k} file not found: {p}")
                prints[k] = store.input_fingerprint(p)
        except (ValueError, FileNotFoundError) as e:
            failed.append({"id": it.id, "path": next(iter(inputs.values()), it.source), "error": str(e)})
            continue
        chash = store.config_hash(task.name, task.version, opts, prints)
        outputs = task.output_paths(out, it.id)
        sidecar = out / f"{it.id}.json"
        if not force and store.is_done(sidecar, chash, {k: str(p) for k, p in outputs.items()}):
            skipped.append(it.id)
            continue
        todo.append(
            {
                "id": it.id,
                "inputs": {k: str(Path(p).resolve()) for k, p in inputs.items()},
                "options": opts,
                "fingerprints": prints,
                "outputs": {k: str(p.resolve()) for k, p in outputs.items()},
                "sidecar": str(sidecar.resolve()),
                "config_hash": chash,
                "threads": threads,
                "engine": engine,
            }
        )
    return todo, skipped, failed


# ---------------------------------------------------------------------------------------------- engines
def _local(task: Task, specs: list[dict[str, Any]], workers: int, threads: int) -> Iterator[dict[str, Any]]:
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    ex = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=mp.get_context("spawn"),
        initializer=_init_local_worker,
        initargs=(threads,),
    )
    with _environ(worker_env(threads)):  # the pool spawns its processes on the first submit
        futures = {ex.submit(execute_item, task, s): s for s in specs}
    clean = False
    try:
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                try:
                    yield f.result()
                except BrokenProcessPool as e:
                    s = futures[f]
                    yield {
                        "id": s["id"],
                        "status": "failed",
                        "path": next(iter(s["inputs"].values()), ""),
                        "error": f"worker process died ({type(e).__name__}); rerun to retry",
                        "seconds": 0.0,
                    }
        clean = True
    finally:
        if clean:
            ex.shutdown(wait=True)
        else:  # interrupted: drop what has not started, stop the running items (their temp files stay)
            procs = list((getattr(ex, "_processes", None) or {}).values())
            ex.shutdown(wait=False, cancel_futures=True)
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(timeout=5)


def _ray(
    task: Task, specs: list[dict[str, Any]], workers: int | None, threads: int, address: str | None
) -> Iterator[dict[str, Any]]:
    try:
        import ray
    except ImportError:
        raise ValueError("engine 'ray' needs Ray: pip install 'ua3d[ray]'") from None
    started = False
    if not ray.is_initialized():
        handler = signal.getsignal(signal.SIGTERM)
        if address is None:
            ray.init(num_cpus=(workers or 1) * threads, include_dashboard=False, log_to_driver=False)
        else:
            try:
                ray.init(address=address, log_to_driver=False)
            except (ConnectionError, RuntimeError) as e:
                raise ValueError(f"address {address!r}: could not connect to a Ray cluster ({e})") from None
        started = True
        if callable(handler) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, handler)  # Ray's core worker installs its own (it dumps and dies)
    remote = ray.remote(execute_item).options(
        num_cpus=threads, max_retries=1, runtime_env={"env_vars": worker_env(threads)}
    )
    slots = max(1, int(ray.cluster_resources().get("CPU", threads)) // threads)
    # Up to two tasks per slot in flight keeps every slot busy without flooding the object store; asked for
    # fewer workers than the cluster has slots, exactly ``workers`` tasks are in flight at any time.
    window = workers if workers is not None and workers < slots else 2 * slots
    task_ref = ray.put(task)
    queue = list(specs)
    pending: dict[Any, dict[str, Any]] = {}
    clean = False
    try:
        while queue or pending:
            while queue and len(pending) < window:
                s = queue.pop(0)
                pending[remote.remote(task_ref, s)] = s
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                s = pending.pop(ref)
                try:
                    yield ray.get(ref)
                except Exception as e:  # noqa: BLE001 - a worker that died: the item failed, the run goes on
                    yield {
                        "id": s["id"],
                        "status": "failed",
                        "path": next(iter(s["inputs"].values()), ""),
                        "error": f"Ray task failed: {type(e).__name__}: {str(e).splitlines()[0]}",
                        "seconds": 0.0,
                    }
        clean = True
    finally:
        if not clean and not started:
            # On a cluster we joined, ask Ray to stop what is still queued or running. A local instance we
            # started is torn down whole by the shutdown below: force-cancelling there raced a finishing
            # task inside Ray's task manager (a fatal check in Ray 2.60, seen as exit code 1 on SIGTERM).
            for ref in pending:
                ray.cancel(ref)
        if started:
            ray.shutdown()


def _in_process(task: Task, specs: list[dict[str, Any]], threads: int) -> Iterator[dict[str, Any]]:
    """``workers=0``: the items one by one in this process; the caller's torch thread count is restored."""
    global _THREADS
    import torch

    before = torch.get_num_threads()
    try:
        for s in specs:
            yield execute_item(task, s)
    finally:
        torch.set_num_threads(before)
        _THREADS = None


# ---------------------------------------------------------------------------------------------- entry point
def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="item", disable=not enabled, dynamic_ncols=True, leave=True)


def run(
    task: str | Task,
    items: Iterable[Item] | str | os.PathLike | dict[str, str],
    *,
    out: str | os.PathLike,
    engine: str = "local",
    workers: int | None = None,
    threads: int | None = None,
    address: str | None = None,
    options: dict[str, Any] | None = None,
    shared_inputs: dict[str, str] | None = None,
    force: bool = False,
    dry_run: bool = False,
    progress: bool = False,
    verbose: bool = False,
    log=None,
) -> BatchSummary:
    """Run ``task`` over ``items`` into the folder ``out`` (module docstring: plan, engines, resume rules).

    Parameters
    ----------
    task : a registered task name (``"depth-sr"``, ``"upsample"``, ``"lift"``, ``"fuse-frames"``) or a :class:`Task`.
    items : a list of :class:`Item`, a manifest path (CSV / JSON lines) or ``{input kind: glob}``.
    out : output folder (created).
    engine : ``"local"`` (process pool) or ``"ray"``.
    workers : parallel items (default: the usable cores; on a Ray cluster: as many as its CPUs allow).
        ``0`` runs the items in this process, one by one (local only).
    threads : torch threads per item (default ``max(1, cores // workers)``; 1 when joining a Ray cluster).
    address : Ray only: ``None`` (start a local instance), ``"auto"`` or ``"HOST:PORT"``.
    options : run-wide task options (``{"steps": 3}``); per-item options override them.
    shared_inputs : input files common to every item (``{"intrinsics": "K.json"}``); per-item inputs win.
    force : redo items that are already done.
    dry_run : only plan: the summary's ``planned`` lists what would run.
    progress, verbose : a tqdm bar (ETA, last/mean item time); ``verbose`` also writes a line per item.
    log : a file-like for those lines (default stderr).

    Returns
    -------
    BatchSummary (also written to ``<out>/_batch_summary.json`` unless ``dry_run``).

    Raises
    ------
    ValueError
        Unknown task or engine, bad workers / threads, an unreadable manifest, or a glob matching nothing.
    """
    t0 = time.perf_counter()
    t = get_task(task)
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    cores = available_cores()
    on_cluster = engine == "ray" and address is not None
    if workers is None and not on_cluster:
        workers = cores
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise ValueError(f"workers must be an integer >= 0, got {workers!r}")
    if engine == "ray" and workers == 0:
        raise ValueError("workers=0 (in-process) applies to engine 'local' only")
    if threads is None:
        threads = 1 if on_cluster else max(1, cores // max(1, workers or 1))
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    if address is not None and engine != "ray":
        raise ValueError("address applies to engine 'ray' only")
    out = Path(out)
    item_list = _as_items(t, items)
    if t.prepare is not None:
        item_list = t.prepare(item_list)
    summary = BatchSummary(t.name, str(out), engine, workers, threads, dry_run=dry_run)
    specs, summary.skipped, summary.failed = plan(
        t, item_list, out, dict(options or {}), dict(shared_inputs or {}), force, threads, engine
    )
    summary.planned = [s["id"] for s in specs]
    for f in summary.failed:
        summary.results[f["id"]] = {"status": "failed", **f}
    if dry_run:
        summary.wall_s = time.perf_counter() - t0
        return summary
    out.mkdir(parents=True, exist_ok=True)
    store.remove_stale_temps(out)
    log = log or sys.stderr
    bar = _progress(len(specs), progress and bool(specs), t.name)
    times: list[float] = []
    if not specs:
        stream: Iterator[dict[str, Any]] = iter(())
    elif engine == "ray":
        stream = _ray(t, specs, workers, threads, address)
    elif workers == 0:
        stream = _in_process(t, specs, threads)
    else:
        stream = _local(t, specs, workers, threads)
    try:
        for res in stream:
            summary.results[res["id"]] = {k: v for k, v in res.items() if k != "traceback"}
            if res["status"] == "done":
                summary.done.append(res["id"])
                times.append(res["seconds"])
            else:
                summary.failed.append(
                    {"id": res["id"], "path": res.get("path", ""), "error": res.get("error", "")}
                )
                bar.write(f"FAILED {res['id']}: {res.get('path', '')}: {res.get('error', '')}", file=log)
            if verbose:
                bar.write(f"{res['status']:6s} {res['id']}  {res['seconds']:.2f} s", file=log)
            bar.set_postfix_str(
                f"last {res['seconds']:.2f}s mean {sum(times) / max(1, len(times)):.2f}s/item"
            )
            bar.update(1)
    except (KeyboardInterrupt, SystemExit):
        summary.interrupted = True
        raise
    finally:
        if hasattr(stream, "close"):
            stream.close()  # runs the engine's clean-up (cancel, stop workers) on interrupt
        bar.close()
        summary.wall_s = time.perf_counter() - t0
        try:
            store.write_json_atomic(out / SUMMARY_NAME, summary.to_dict())
        except OSError:  # pragma: no cover - the summary is a convenience, the sidecars are the record
            pass
    return summary
