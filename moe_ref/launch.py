"""Start ``W`` worker processes, each with an initialised process group: how a notebook or a test runs
expert parallelism on one machine. Scripts use ``torchrun`` instead (see :mod:`moe_ref.train_ep`).

``spawn(fn, W, *args)`` runs ``fn(rank, W, *args)`` in ``W`` fresh processes (the ``spawn`` start method:
nothing of the parent's threads or state is inherited), returns what each rank returned, in rank order, and
re-raises a rank's exception with its traceback. ``fn`` must be importable (defined in a module, not in a
notebook cell), and its arguments and results must pickle (they cross process boundaries).
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from . import _checks


class WorkerError(RuntimeError):
    """A worker process raised; the message holds its rank and traceback."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for the workers' rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, backend: str, timeout: float, threads: int, fn, args,
            results) -> None:
    try:
        torch.set_num_threads(threads)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout))
        try:
            # pickled here, to bytes: a queue would pass tensors through shared memory that dies with this process
            results.put((rank, True, pickle.dumps(fn(rank, world_size, *args))))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent, with its traceback
        results.put((rank, False, traceback.format_exc()))


def spawn(fn, world_size: int, *args, backend: str = "gloo", timeout: float = 120.0, threads: int = 1) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return their results by rank.

    Args:
        fn: a module-level function (it is pickled by name).
        world_size: ``W``, the number of processes.
        *args: passed to ``fn`` after ``rank`` and ``world_size``.
        backend: ``"gloo"`` (CPU) or ``"nccl"`` (one GPU per rank).
        timeout: seconds for the process group's collectives, and for each rank to finish.
        threads: ``torch.set_num_threads`` in each worker (1: ``W`` workers share the cores without
            oversubscribing them).

    Raises:
        WorkerError: a rank raised (its traceback is in the message), or a rank did not finish in time.
    """
    _checks.positive_int("world_size", world_size)
    _checks.choice("backend", backend, ("gloo", "nccl"))
    timeout = _checks.finite_float("timeout", timeout, minimum=0.0, strict=True)
    _checks.positive_int("threads", threads)
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    workers = [context.Process(target=_worker, args=(rank, world_size, port, backend, timeout, threads, fn, args,
                                                     results), daemon=True)
               for rank in range(world_size)]
    for w in workers:
        w.start()
    done: dict[int, object] = {}
    deadline = time.monotonic() + timeout + 60  # start-up (imports) comes on top of the collectives' timeout
    exited_at: float | None = None
    try:
        while len(done) < world_size:
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue.Empty:
                missing = sorted(set(range(world_size)) - set(done))
                dead = [r for r in missing if workers[r].exitcode is not None]
                if dead:  # exited without a result (killed, os._exit, a crash at start-up); allow one in transit
                    exited_at = exited_at or time.monotonic()
                    if time.monotonic() - exited_at > 2.0:
                        codes = [workers[r].exitcode for r in dead]
                        raise WorkerError(f"rank(s) {dead} of {world_size} exited (code(s) {codes}) without a "
                                          f"result")
                if time.monotonic() > deadline:
                    raise WorkerError(f"rank(s) {missing} of {world_size} did not finish within {timeout + 60:g} s")
                continue
            if not ok:
                raise WorkerError(f"rank {rank} of {world_size} raised:\n{value}")
            done[rank] = pickle.loads(value)
    finally:
        for w in workers:
            w.join(timeout=5)
            if w.is_alive():
                w.terminate()
                w.join()
    return [done[rank] for rank in range(world_size)]


def init_from_env(backend: str | None = None, timeout: float = 300.0) -> tuple[int, int]:
    """Under ``torchrun``: initialise the default process group from its environment; return ``(rank, W)``."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError("RANK and WORLD_SIZE are not set: start this with torchrun --nproc-per-node N -m ...")
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    return dist.get_rank(), dist.get_world_size()
