"""Where the per-task work runs: in-process, a local process pool (default), or Ray.

The stage hands an executor a list of task descriptions (plain dicts) and one picklable entry
point, `lmforge.data.stage.run_task`; every task writes its own files and an atomically written
completion marker, so the executor only has to run them -- retrying a failed or killed run is
just running the stage again, which skips the tasks whose marker exists (datatrove's model).

* ``local``: `concurrent.futures.ProcessPoolExecutor`, forked where the OS can fork: workers
  start at once and inherit loaded models, and -- unlike ``spawn`` -- a user's script without an
  ``if __name__ == "__main__"`` guard is not re-executed in every worker. Workers never touch
  torch or print, so forking a parent with such threads is safe. ``workers: 1`` runs in-process.
  Workers die with their driver: on Linux the kernel sends them SIGKILL when it exits
  (``PR_SET_PDEATHSIG``), elsewhere a watchdog thread in each worker exits when its parent is
  gone. A ``kill -9`` of ``lmforge data`` therefore leaves no worker writing into ``work/``.
* ``ray``: each task is a Ray remote function on an existing cluster (``ray_address``) or a
  local one started on the spot; Ray schedules them across machines. Needs ``pip install ray``.

The finalising phase (global dedup, classifier, mixing, writing) runs on the driver.
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import ctypes.util
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

from lmforge.errors import ConfigError


def run_tasks(
    fn: Callable[..., dict],
    task_args: list[tuple],
    *,
    executor: str = "local",
    workers: int = 1,
    ray_address: str | None = None,
    on_done: Callable[[int, dict], None] | None = None,
) -> None:
    """Run ``fn(*args)`` for every args tuple; `on_done(i, result)` is called in the driver."""
    if not task_args:
        return
    if executor == "ray":
        _run_ray(fn, task_args, workers, ray_address, on_done)
    elif executor == "local":
        if workers <= 1 or len(task_args) == 1:
            for i, args in enumerate(task_args):
                result = fn(*args)
                if on_done:
                    on_done(i, result)
            return
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        with cf.ProcessPoolExecutor(
            max_workers=min(workers, len(task_args)),
            mp_context=ctx,
            initializer=die_with_parent,
            initargs=(os.getpid(),),
        ) as pool:
            futures = {pool.submit(fn, *args): i for i, args in enumerate(task_args)}
            try:
                for fut in cf.as_completed(futures):
                    result = fut.result()  # re-raises a worker's exception here
                    if on_done:
                        on_done(futures[fut], result)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    else:
        raise ConfigError(f"data.executor={executor!r}: expected 'local' or 'ray'")


PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Make this (worker) process exit when `parent_pid` does; a pool initializer."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
                if os.getppid() != parent_pid:  # the parent died before prctl took effect
                    os._exit(1)
                return
        except OSError:
            pass
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()


def _watch_parent(parent_pid: int, every_s: float = 0.5) -> None:
    while os.getppid() == parent_pid:
        time.sleep(every_s)
    os._exit(1)


def _run_ray(fn, task_args, workers, ray_address, on_done) -> None:
    try:
        import ray
    except ImportError as e:
        raise ConfigError(
            "data.executor='ray' needs Ray: `pip install 'ray[default]'`, or use executor: local"
        ) from e
    if not ray.is_initialized():
        ray.init(address=ray_address, ignore_reinit_error=True, log_to_driver=False)
    remote = ray.remote(num_cpus=1)(fn)
    pending: dict = {}
    queue = list(enumerate(task_args))
    limit = max(1, workers)
    while queue or pending:
        while queue and len(pending) < limit:
            i, args = queue.pop(0)
            pending[remote.remote(*args)] = i
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            i = pending.pop(ref)
            result = ray.get(ref)
            if on_done:
                on_done(i, result)
