"""The inference engine: one lane per model, bounded admission, time-outs, cancellation and drain.

The tool layer awaits :meth:`Engine.submit` on the event loop; a model never runs there. A model in this process
gets a :class:`~vlm_tools.engine.batch_lane.BatchLane` (a queue and worker threads that micro-batch), a model
served elsewhere a :class:`~vlm_tools.engine.concurrent_lane.ConcurrentLane` (each request on its own). Admission is
per model: at most ``queue_size`` requests wait for each, so a backlog on one model never refuses work for another,
and past the bound :meth:`Engine.submit` raises :class:`~vlm_tools.errors.Busy` at once.
"""

from .core import Engine

__all__ = ["Engine"]
