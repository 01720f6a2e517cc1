"""Mappers: where a job's per-file or per-partition work runs.

A job (encode a folder, fit from tables, the scheduled run) is written once, here in the library, and
hands its independent units of work to a *mapper*: the one thing that varies between a notebook, the
``vq`` command, a Prefect flow and a Dask cluster. A unit of work is a module-level function and one
small, picklable item (paths, fingerprints, settings), so that any mapper can ship it anywhere.

A mapper is called as ``mapper(fn, items)`` and yields ``(index, outcome)`` pairs in the order the
units finish, ``outcome`` being ``fn(items[index])``. A unit that fails either raises at once from the
iterator (:func:`serial` and :class:`Threads`: fail fast, as a plain Python call would) or comes back
as the exception object itself (the Prefect and Dask mappers of ``vq_flows``, which retry what a retry
can fix and let the other units finish); the job then finishes the rest and reports every failure.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

from vq_pipeline.validate import check_int

T = TypeVar("T")


class Mapper(Protocol):
    """Runs ``fn`` on every item; yields ``(index, result or exception)`` as each unit finishes."""

    def __call__(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Any]]: ...


def serial(fn: Callable[[T], Any], items: Sequence[T]) -> Iterator[tuple[int, Any]]:
    """The units one after the other in this process, in order; the first failure raises."""
    for i, item in enumerate(items):
        yield i, fn(item)


class Threads:
    """The units on ``max_workers`` threads of this process; the first failure raises (after the
    units already running finish), in the order the units finish."""

    def __init__(self, max_workers: int) -> None:
        self.max_workers = check_int("max_workers", max_workers, minimum=1)

    def __call__(self, fn: Callable[[T], Any], items: Sequence[T]) -> Iterator[tuple[int, Any]]:
        if not items:
            return
        with concurrent.futures.ThreadPoolExecutor(self.max_workers) as pool:
            index = {pool.submit(fn, item): i for i, item in enumerate(items)}
            try:
                for future in concurrent.futures.as_completed(index):
                    yield index[future], future.result()
            finally:
                for future in index:
                    future.cancel()


__all__ = ["Mapper", "Threads", "serial"]
