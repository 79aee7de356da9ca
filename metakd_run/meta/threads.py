"""The task threads of the ``loop`` strategy on a CPU: a kept pool of workers, a replica of the model
per worker (``functional_call`` swaps a module's tensors in place, so two threads must never call one
module at once), and the calling thread's grad mode and autocast carried into a worker."""

from __future__ import annotations

import copy
import threading
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metakd_run.meta.losses import Params

WORKER = threading.local()  # a worker thread's model replicas, by id of the model (LoopStrategy.backward)


POOLS: dict[int, ThreadPoolExecutor] = {}


REPLICAS: weakref.WeakKeyDictionary[nn.Module, list[nn.Module]] = weakref.WeakKeyDictionary()


def call_model(model: nn.Module, params: Params, x: Tensor) -> Any:
    """``functional_call(model, params, (x,))``, on this thread's replica of ``model`` in a worker.

    ``functional_call`` swaps a module's tensors in place for the call, so two threads must never
    call one module at once: every per-task call of a model goes through here.
    """
    return functional_call(replica_of(model), params, (x,))


def replica_of(model: nn.Module) -> nn.Module:
    """This thread's replica of ``model`` in a worker, else ``model`` itself: call a submodule of it
    (CNP's encoder) through this, never through ``model`` directly."""
    return getattr(WORKER, "models", {}).get(id(model), model)


def replicas(model: nn.Module, workers: int) -> list[nn.Module]:
    """``workers`` copies of ``model``, kept while it lives: their structure is used, not their values."""
    kept = REPLICAS.setdefault(model, [])
    while len(kept) < workers:
        kept.append(copy.deepcopy(model))
    return kept[:workers]


def pool(workers: int) -> ThreadPoolExecutor:
    """One pool of ``workers`` threads per process, kept: threads are reused from step to step."""
    if workers not in POOLS:
        POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="metakd-task")
    return POOLS[workers]


@contextmanager
def thread_state(grad_enabled: bool, autocast: bool, dtype: torch.dtype) -> Iterator[None]:
    """The calling thread's grad mode and CPU autocast, which are thread-local, in a worker."""
    with torch.set_grad_enabled(grad_enabled), torch.autocast("cpu", dtype=dtype, enabled=autocast):
        yield
