"""Makes peft know HyCAM in every Python process, without importing torch (or hycam) into any of them.

peft has no plugin mechanism: a process that reads an `adapter_config.json` with `"peft_type": "HYCAM"` and
never imported hycam fails with `KeyError: 'HYCAM'`, and the lm-eval command line, `AutoPeftModelForCausalLM`
and serving tools read adapters in processes the user did not write. hycam's install puts `hycam-peft.pth`
into site-packages; Python runs its one line at start-up, which puts a `PeftWatcher` on `sys.meta_path`. The
watcher imports nothing: when a process imports peft, it lets peft's own loader run, then imports hycam, whose
import registers HyCAM as a peft method. A process that never imports peft never imports hycam.
The line looks for this module first: where it cannot be found (an editable install whose checkout was moved
or deleted) it does nothing, rather than print an error at the start of every Python process.

This module stays outside the `hycam` package: importing anything inside it would import hycam's
`__init__`, and with it torch, at every interpreter start.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import warnings


class PeftWatcher(importlib.abc.MetaPathFinder):
    """Finds nothing itself; hands out peft's own spec with a loader that imports hycam once peft is loaded."""

    def find_spec(self, name, path=None, target=None):
        if name != "peft":
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else getattr(finder, "find_spec", lambda *_: None)(name, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _ThenHyCAM(spec.loader)
                return spec
        return None


class _ThenHyCAM(importlib.abc.Loader):
    """peft's loader, then `import hycam`."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self.loader  # peft's own loader from here on
        self.loader.exec_module(module)
        _register()


def _register() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, PeftWatcher)]
    if "hycam" in sys.modules:  # hycam is being imported (perhaps what imported peft): it registers itself
        return
    try:
        importlib.import_module("hycam")  # its import registers HyCAM as a peft method
    except Exception as err:  # a broken hycam must not break peft for everything else
        warnings.warn(f"hycam is installed but could not be imported, so peft will not know HyCAM adapters: {err}",
                      stacklevel=2)


def install() -> None:
    """What `hycam-peft.pth` runs at interpreter start-up."""
    if "peft" not in sys.modules and not any(isinstance(finder, PeftWatcher) for finder in sys.meta_path):
        sys.meta_path.insert(0, PeftWatcher())
