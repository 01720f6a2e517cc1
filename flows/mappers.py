"""The flows' mapper: each unit of a library job as one run of a Prefect task.

:class:`TaskMapper` is the flows' answer to "where does the per-file work run"
(:mod:`vq_pipeline.jobs.mappers`): on the flow's task runner (threads of the flow process), or on a
Dask cluster (``dask``: ``local:N`` or a scheduler address, entered the first time there is work).
Every unit keeps its own task run, retries and logs in the Prefect UI; a unit that still fails after
its retries comes back as its exception, so the job finishes the others and reports them all.
"""

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prefect import get_run_logger
from prefect.futures import as_completed

from vq_pipeline.errors import ConfigurationError, InvalidInputError


class TaskMapper:
    """Runs ``task`` (a Prefect task whose function is the job's unit of work) once per item."""

    def __init__(self, task: Any, *, dask: str | None = None, stack: contextlib.ExitStack | None = None) -> None:
        if dask and stack is None:
            raise ConfigurationError(
                f"dask={dask!r} without an ExitStack; expected the stack that holds the cluster for the flow's "
                f"run. Fix: pass stack=contextlib.ExitStack() entered around the run."
            )
        self.task, self.dask, self.stack = task, dask, stack
        self.runner: Any = None

    def __call__(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        if fn is not self.task.fn:
            raise InvalidInputError(
                f"fn={fn.__name__}; this mapper runs the task of {self.task.fn.__name__}. Fix: give the job a "
                f"TaskMapper of the task that wraps {fn.__name__}."
            )
        if not items:
            return
        futures = [self._submit(item) for item in items]
        index = {id(future): i for i, future in enumerate(futures)}
        for future in as_completed(futures):
            try:
                yield index[id(future)], future.result()
            except BaseException as exc:  # noqa: BLE001 - handed back to the job, which reports every failure
                yield index[id(future)], exc

    def _submit(self, item: Any) -> Any:
        if not self.dask:
            return self.task.submit(item)
        if self.runner is None:
            from vq_flows.dask import dask_task_runner

            self.runner = self.stack.enter_context(dask_task_runner(self.dask))
            get_run_logger().info(
                "running %s on the Dask cluster %s", self.task.name, self.runner.client.scheduler.address
            )
        return self.runner.submit(self.task, parameters={"work": item})


__all__ = ["TaskMapper"]
