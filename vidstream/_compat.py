"""Old module names, importable for one release with a ``DeprecationWarning``.

``import vidstream.cache`` (and the other names below) gives a module that forwards every
attribute to where it lives now."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "vidstream.attention": ("vidstream.ops.attention",),
    "vidstream.kv_store": ("vidstream.ops.rope3d",),
    "vidstream.lowrank": ("vidstream.ops.lowrank",),
    "vidstream.rope": ("vidstream.ops.rope3d",),
    "vidstream.selection": ("vidstream.ops.select_blocks",),
    "vidstream.cache": ("vidstream.streaming.bounded_cache", "vidstream.streaming.naive_cache",
                        "vidstream.streaming.config", "vidstream.streaming.compressors"),
    "vidstream.compress": ("vidstream.streaming.compressors",),
    "vidstream.lowrank_kv": ("vidstream.streaming.lowrank_kv",),
    "vidstream.model": ("vidstream.streaming.model", "vidstream.streaming.full_sequence"),
    "vidstream.pipeline": ("vidstream.streaming.generator",),
}


class _Forwarder(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module):
        targets = MOVED[module.__name__]
        warnings.warn(f"{module.__name__} is deprecated and will be removed in the next release; "
                      f"import from {' / '.join(targets)}", DeprecationWarning, stacklevel=2)
        homes = [importlib.import_module(t) for t in targets]

        def __getattr__(name):
            for home in homes:
                if hasattr(home, name):
                    return getattr(home, name)
            raise AttributeError(f"module {module.__name__!r} (moved to {', '.join(targets)}) "
                                 f"has no attribute {name!r}")

        module.__getattr__ = __getattr__


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in MOVED:
            return importlib.util.spec_from_loader(name, _Forwarder())
        return None


def install():
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
