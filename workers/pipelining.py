"""Run the stages of a job side by side: planning ahead, device work, host work and commits.

Threads, not processes: the device work (torch), the tokenizer (Rust) and Parquet encoding
(Arrow) release the GIL, so a planner thread and a host thread overlap the forward pass without
copying shards between processes. Every queue is bounded, so memory stays bounded when one stage
is slower than the others (a slow disk holds back the device, it does not fill the RAM).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")

PLAN_AHEAD = 2
"""Shards the planner thread prepares ahead of the device (local) or of the actors (Ray)."""

_DONE = object()


class _Raised:
    """An exception of the producer, carried to the consumer."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


@contextmanager
def prefetch(items: Iterable[T], depth: int) -> Iterator[Iterator[T]]:
    """Iterate ``items`` in a background thread, at most ``depth`` items ahead of the consumer.

    The consumer sees the same items in the same order; an exception raised while producing is
    raised in the consumer at the item where it happened. Leaving the ``with`` block early stops
    the producer (it finishes the item it is making and drops it).

    Usage::

        with prefetch(iter_shards(spec, tokenizer), depth=2) as shards:
            for shard in shards: ...
    """
    if depth < 1:
        raise ValueError(f"prefetch depth must be >= 1, got {depth}")
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(value: object) -> bool:
        while not stop.is_set():
            try:
                buffer.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    iterator = iter(items)

    def produce() -> None:
        try:
            for item in iterator:
                if not put(item):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            put(_Raised(e))
            return
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()  # a generator's clean-up (open files) runs now, in its own thread
        put(_DONE)

    thread = threading.Thread(target=produce, name="codelens-prefetch", daemon=True)
    thread.start()

    def consume() -> Iterator[T]:
        while True:
            value = buffer.get()
            if value is _DONE:
                return
            if isinstance(value, _Raised):
                raise value.error
            yield value  # type: ignore[misc]

    try:
        yield consume()
    finally:
        stop.set()
        thread.join()
