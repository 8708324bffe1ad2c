"""The inference engine: one lane per model, bounded admission, time-outs, cancellation and drain.

The tool layer awaits :meth:`Engine.submit` on the event loop; a model never runs there. How requests reach a
model and when they are refused: :class:`~vlm_tools.engine.core.Engine`.
"""

from .core import Engine

__all__ = ["Engine"]
