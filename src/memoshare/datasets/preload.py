"""Preloading a CachedDataset in background threads: the order of indices, progress, Preload."""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import Any

from ..backends import BackendError
from .buffer import RETRY_PAUSES
from .cache import SCAN_BATCH, SampleCache

logger = logging.getLogger("memoshare")


def _flatten(items: Iterable[Any]) -> Iterator[Any]:
    for item in items:
        if isinstance(item, list | tuple):  # a batch sampler yields lists of indices
            yield from item
        else:
            yield item


@contextmanager
def _rng_untouched(sampler: Any) -> Iterator[None]:
    """Iterate a sampler without changing what it (or torch's global RNG) yields next."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    saved_global = torch.get_rng_state()
    generator = getattr(sampler, "generator", None)
    saved = generator.get_state() if isinstance(generator, torch.Generator) else None
    try:
        yield
    finally:
        torch.set_rng_state(saved_global)
        if saved is not None:
            generator.set_state(saved)


def indices_in_order(order: Iterable[int] | None, length: int) -> Iterable[Any]:
    """The indices a preload of ``order`` (a sequence, batches, or a sampler) visits."""
    if order is None:
        return range(length)
    if isinstance(order, range):
        return order
    if isinstance(order, list | tuple):
        # A list of batches (as a batch sampler yields them) is flattened, like a sampler.
        return list(_flatten(order)) if any(not isinstance(i, int) for i in order) else order
    with _rng_untouched(order):
        return list(_flatten(iter(order)))


# -- Preload ---------------------------------------------------------------------------------------
class _LogProgress:
    """A stand-in for tqdm: a log line every 10%."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.n, self._next = total, desc, 0, 0.1

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.total and self.n / self.total >= self._next:
            logger.info("memoshare: %s: %d/%d", self.desc, self.n, self.total)
            while self._next <= self.n / self.total:
                self._next += 0.1

    def close(self) -> None:
        pass


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(enabled: bool, total: int, desc: str) -> Any:
    if not enabled:
        return _NoProgress()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        logger.info("memoshare: tqdm is not installed (pip install 'memoshare[progress]'): "
                    "logging the progress of %s instead", desc)  # fmt: skip
        return _LogProgress(total, desc)
    return tqdm(total=total, desc=desc, unit="sample", dynamic_ncols=True)


class Preload:
    """A background fill of a :class:`CachedDataset`, made by :meth:`CachedDataset.preload`.

    It computes the samples at ``order`` that are not stored yet (``load(i)``, stored under
    ``key_of(i)``) in ``workers`` threads, holding at most about ``max_bytes`` in memory.
    Indices a cancelled or stopped preload did not reach are in neither count below.

    Attributes:
        total: indices to preload.
        already_cached: of those, found stored when the preload reached them.
        computed: samples this preload computed.
        error: the exception that stopped it, if any (re-raised by :meth:`wait`).
    """

    def __init__(
        self,
        cache: SampleCache,
        order: list[int],
        *,
        key_of: Callable[[int], str],
        load: Callable[[int], Any],
        workers: int,
        max_bytes: int,
        progress: bool,
    ) -> None:
        self._cache = cache
        self._order = order
        self._key_of = key_of
        self._load = load
        self.workers = workers
        self.max_bytes = max_bytes
        self.total = len(order)
        self.already_cached = 0
        self.computed = 0
        self.error: BaseException | None = None
        self._cancel = threading.Event()  # cancel() was called
        self._stop = threading.Event()  # start no more samples (cancelled, error, store down)
        self._done = threading.Event()
        self._progress = progress
        self._pid = os.getpid()  # a forked child inherits this object but not its threads
        self._thread = threading.Thread(
            target=self._run, name=f"memoshare-preload-{cache.dataset_name}", daemon=True
        )
        self._thread.start()

    @property
    def done(self) -> bool:
        """Whether the preload finished (completely, cancelled or stopped by an error).

        In a forked child (a DataLoader worker) the preload runs in the parent only: there it
        counts as done.
        """
        return self._done.is_set() or os.getpid() != self._pid

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._cancel.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the preload is done; return ``False`` if ``timeout`` passed first.

        Raises the exception that stopped the preload (the dataset's own, say), if any.
        """
        if os.getpid() != self._pid:
            return True  # the preload's threads live in the parent process
        finished = self._done.wait(timeout)
        if finished and self.error is not None:
            raise self.error
        return finished

    def cancel(self, wait: bool = True) -> None:
        """Stop starting samples; with ``wait``, return once the running ones are written."""
        if os.getpid() != self._pid:
            return  # the preload's threads live in the parent process
        self._cancel.set()
        self._stop.set()
        if wait and threading.current_thread() is not self._thread:
            self._done.wait()

    def __repr__(self) -> str:
        if not self.done:
            state = "cancelling" if self.cancelled else "running"
        elif self.computed + self.already_cached < self.total:
            state = "cancelled" if self.cancelled else "stopped"
        else:
            state = "done"
        return (
            f"<Preload of {self._cache.dataset_name!r}: {state}, {self.computed} computed, "
            f"{self.already_cached} already cached of {self.total}>"
        )

    # -- the coordinating thread ---------------------------------------------------------------
    def _run(self) -> None:
        cache = self._cache
        bar = _progress_bar(self._progress, self.total, f"preload {self._cache.dataset_name}")
        running: set[Future[bool | None]] = set()
        try:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="memoshare-preload") as pool:
                for start in range(0, self.total, SCAN_BATCH):
                    if self._stopping(cache):
                        break
                    chunk = self._order[start : start + SCAN_BATCH]
                    todo = self._not_stored(cache, chunk)
                    self.already_cached += len(chunk) - len(todo)
                    bar.update(len(chunk) - len(todo))
                    for index in todo:
                        self._make_room(cache, running, bar)
                        if self._stopping(cache):
                            break
                        running.add(pool.submit(self._load_one, index))
                while running:
                    self._reap(running, bar)
            cache.buffer.flush(attempts=len(RETRY_PAUSES) + 1)
        except BaseException as exc:  # reported through wait(); the thread must not die silently
            self.error = exc
            logger.warning("memoshare: preload of %r stopped: %r", self._cache.dataset_name,
                           exc)  # fmt: skip
        finally:
            self._stop.set()  # stops queued tasks if we left early
            bar.close()
            self._done.set()

    def _stopping(self, cache: SampleCache) -> bool:
        if self._stop.is_set():
            return True
        if cache.client.health.failing:
            logger.warning("memoshare: preload of %r stopped: the store is unavailable",
                           self._cache.dataset_name)  # fmt: skip
            self._stop.set()
            return True
        return False

    def _not_stored(self, cache: SampleCache, chunk: list[int]) -> list[int]:
        keys = {self._key_of(i): i for i in dict.fromkeys(chunk)}
        try:
            stored = cache.stored_among(list(keys))
        except BackendError as exc:
            cache.client.failed(exc, "read")
            return []
        return [i for k, i in keys.items() if k not in stored and cache.buffer.get(k) is None]

    def _make_room(self, cache: SampleCache, running: set[Future[bool | None]], bar: Any) -> None:
        """Wait until another task may start: fewer than ``workers`` run, and the bytes held
        plus one more sample fit in ``max_bytes`` (one task always may run)."""
        while running:
            mean = _mean_sample(cache)
            held = cache.buffer.pending_bytes + len(running) * mean
            # Until a sample is measured (mean 0) its size is unknown: one task at a time, or
            # ``workers`` samples larger than max_bytes / workers would be held at once.
            if mean and len(running) < self.workers and held + mean <= self.max_bytes:
                return
            # Writing frees what waits in the buffer; if the store refuses, wait for a task.
            if held + mean > self.max_bytes and cache.buffer.pending and cache.buffer.flush():
                continue
            self._reap(running, bar)
        if cache.buffer.pending_bytes + _mean_sample(cache) > self.max_bytes:
            cache.buffer.flush()

    def _reap(self, running: set[Future[bool | None]], bar: Any) -> None:
        done, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
        for future in done:
            running.discard(future)
            computed = future.result()  # re-raises the dataset's exception: stops the preload
            if computed is None:
                continue  # cancelled before it started: neither cached nor computed
            if computed:
                self.computed += 1
            else:
                self.already_cached += 1
            bar.update(1)

    def _load_one(self, index: int) -> bool | None:
        """Whether it computed the sample (``False``: found stored; ``None``: not started)."""
        if self._stop.is_set():
            return None
        load = self._load
        return self._cache.ensure_stored(self._key_of(index), index, lambda: load(index))


def _mean_sample(cache: SampleCache) -> float:
    """Mean bytes of a sample: of those written, else of those waiting, else 0."""
    if cache.sizes.samples:
        return cache.sizes.mean
    buffer = cache.buffer
    waiting = len(buffer.pending)  # once: a flush in another thread may empty it meanwhile
    return buffer.pending_bytes / waiting if waiting else 0.0
