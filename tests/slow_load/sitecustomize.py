"""Slows every model load of a server process down, for the tests of what a client sees while weights load.

Put this directory on a server's ``PYTHONPATH`` and set ``VLM_TOOLS_TEST_SLOW_LOAD_S``: Python imports
``sitecustomize`` at start-up, and this one wraps ``LocalBackend.load`` as soon as its module is imported (a
meta-path hook, so nothing heavy is imported any earlier than the server itself imports it).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import time

_DELAY_S = float(os.environ.get("VLM_TOOLS_TEST_SLOW_LOAD_S", "0") or 0)
_TARGET = "vlm_tools.backends.local"


class _SlowLoads(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
        if name != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        original = spec.loader.exec_module

        def exec_module(module):  # type: ignore[no-untyped-def]
            original(module)
            load = module.LocalBackend.load.__func__

            def slow_load(cls, *args, **kwargs):  # type: ignore[no-untyped-def]
                time.sleep(_DELAY_S)
                return load(cls, *args, **kwargs)

            module.LocalBackend.load = classmethod(slow_load)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if _DELAY_S > 0:
    sys.meta_path.insert(0, _SlowLoads())
