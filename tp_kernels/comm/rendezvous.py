"""The waits of group setup: bounded by TP_KERNELS_COMM_TIMEOUT, naming the ranks that did not come, and
interruptible by Ctrl-C within one poll.

A gloo collective waits for the process group's own timeout (torch's default is 30 minutes; TPGroup.init
used 300 s) with the GIL-free C++ thread deaf to SIGINT, and its error names no rank. So before the first
collective of a setup every rank checks in through the torch.distributed store instead: it sets a key of
its own, adds one to a counter, and polls the counter from Python every POLL_S (a signal raises
KeyboardInterrupt between two polls); at the timeout it raises naming the ranks whose keys are missing.
After the barrier every rank is alive and inside the same setup, so the collectives that follow finish.

- `barrier(store, key, rank, world_size, timeout_s, what)`: the barrier itself.
- `group_barrier(pg, name, rank, world_size)`: the one at the start of making a TPGroup, under a key
  unique to this group name and how many groups of that name this process made before.
- `init_store(init_method, rank, world_size, timeout_s)`: the store torch.distributed's rendezvous would
  make for an env://, tcp:// or file:// init_method, made without waiting for the other ranks (torch's
  TCPStore server would wait for every client in its constructor, naming none), so that `barrier` waits.
"""
from __future__ import annotations

import datetime
import logging
import os
import time
from collections import Counter
from typing import List, Optional
from urllib.parse import urlparse

import torch.distributed as dist

from tp_kernels.comm.base import TIMEOUT_ENV, comm_timeout_s

log = logging.getLogger(__name__)

# 20 ms between polls: a SIGINT raises KeyboardInterrupt within ~20 ms (the 100 ms a user notices), at
# 50 store round trips a second per waiting rank (~30 us each on one host).
POLL_S = 0.02
# A TCP store client retries its connection for this long per attempt, then Python gets a chance to act
# on a signal before the next attempt; doubled up to CONNECT_ATTEMPT_MAX_S for slow networks.
CONNECT_ATTEMPT_S = 0.1
CONNECT_ATTEMPT_MAX_S = 1.0
_GENERATIONS: Counter = Counter()


class SetupTimeout(RuntimeError):
    """A rank did not reach a setup barrier within TP_KERNELS_COMM_TIMEOUT; the message names it."""


def barrier(store: dist.Store, key: str, rank: int, world_size: int, timeout_s: float, what: str) -> None:
    """Return once all world_size ranks reached this barrier (under key); raise SetupTimeout naming the
    missing ranks after timeout_s. Every rank must use the same key, once."""
    store.set(f"{key}/rank{rank}", str(os.getpid()))
    arrived = store.add(f"{key}/count", 1)
    deadline = time.monotonic() + timeout_s
    while arrived < world_size:
        if time.monotonic() > deadline:
            missing = missing_ranks(store, key, world_size)
            raise SetupTimeout(f"{what}: rank(s) {', '.join(map(str, missing))} of {world_size} did not arrive within "
                               f"{timeout_s:g} s ({TIMEOUT_ENV}); this is rank {rank}")
        time.sleep(POLL_S)  # Python runs signal handlers here: Ctrl-C raises KeyboardInterrupt
        arrived = store.add(f"{key}/count", 0)


def missing_ranks(store: dist.Store, key: str, world_size: int) -> List[int]:
    return [r for r in range(world_size) if not store.check([f"{key}/rank{r}"])]


def group_barrier(pg: dist.ProcessGroup, name: str, rank: int, world_size: int) -> None:
    """The barrier at the start of making the TPGroup `name` over pg. A process group without a store that
    torch exposes is set up without it (gloo's own timeout then bounds the setup; logged)."""
    try:
        store = dist.distributed_c10d._get_process_group_store(pg)
    except (AttributeError, KeyError, RuntimeError, ValueError) as e:  # a private API of torch: may move
        log.info("group %r: no store for the setup barrier (%s); its setup waits are gloo's", name, e)
        return
    _GENERATIONS[name] += 1
    barrier(store, f"tp_kernels/setup/{name}/{_GENERATIONS[name]}", rank, world_size, comm_timeout_s(),
            f"making TPGroup {name!r}")


def init_store(init_method: str, rank: int, world_size: int, timeout_s: float) -> Optional[dist.Store]:
    """The store for init_method (env://, tcp://host:port, file:///path), made without waiting for the other
    ranks; None for another scheme (then torch's rendezvous is used as it is)."""
    url = urlparse(init_method)
    if url.scheme == "file":
        return dist.FileStore(url.path, world_size)
    if url.scheme == "env":
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing:
            raise ValueError(f"init_method env:// needs {' and '.join(missing)} set (torchrun sets them)")
        host, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    elif url.scheme == "tcp":
        host, port = url.hostname, url.port
    else:
        return None
    try:
        port = int(port)
    except (TypeError, ValueError):
        raise ValueError(f"the store's port must be an integer, got {port!r} (init_method {init_method!r})") from None
    # torchrun's agent hosts the store itself when it says so: then every rank is a client
    serves = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    if serves:
        return dist.TCPStore(host, port, world_size, True, datetime.timedelta(seconds=timeout_s),
                             wait_for_workers=False, multi_tenant=True)
    return _connect(host, port, world_size, timeout_s)


def _connect(host: str, port: int, world_size: int, timeout_s: float) -> dist.Store:
    """A TCPStore client, retrying in short attempts (so Ctrl-C is acted on between them) until timeout_s."""
    deadline = time.monotonic() + timeout_s
    attempt_s = CONNECT_ATTEMPT_S
    while True:
        remaining = deadline - time.monotonic()
        try:
            store = dist.TCPStore(host, port, world_size, False,
                                  datetime.timedelta(seconds=max(min(attempt_s, remaining), 0.01)))
            store.set_timeout(datetime.timedelta(seconds=timeout_s))
            return store
        except (RuntimeError, OSError) as e:  # DistNetworkError / DistStoreError derive from RuntimeError
            if time.monotonic() >= deadline:
                raise SetupTimeout(f"rank 0 did not start the store at {host}:{port} within {timeout_s:g} s "
                                   f"({TIMEOUT_ENV}): {e}") from e
        attempt_s = min(2 * attempt_s, CONNECT_ATTEMPT_MAX_S)


__all__ = ["SetupTimeout", "barrier", "group_barrier", "init_store"]
