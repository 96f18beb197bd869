"""moecarve: carve dense LLMs into Mixture-of-Experts models without pre-training.

    import moecarve
    report = moecarve.carve(model, moecarve.CarveConfig.from_string("S2A2E8"), windows)
    moecarve.save(model, "out/carved", tokenizer=tok, report=report)
    model = moecarve.load("out/carved", kernels="auto")  # or moecarve.use_kernels(model) in memory

The public names are imported on first use (PEP 562), so `import moecarve` and `moecarve --help`
do not pay for torch and transformers.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "CalibConfig": ".config", "CarveConfig": ".config", "ConfigError": ".config",
    "CarveReport": ".carve", "carve": ".carve",
    "CondenseConfig": ".condense", "CondenseReport": ".condense", "condense": ".condense",
    "FinetuneConfig": ".finetune", "FinetuneReport": ".finetune", "finetune": ".finetune",
    "MoecarveError": ".errors",
    "TaskConfig": ".eval.tasks", "run_tasks": ".eval.tasks",
    "eval_perplexity": ".eval.perplexity",
    "load": ".io.save", "save": ".io.save",
    "load_windows": ".calibration",
    "use_kernels": ".modules.fast",
    "carve_streamed": ".stream",
}  # fmt: skip
__all__ = sorted(_EXPORTS)


def _resolve(name: str):
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __getattr__(name: str):
    if name in _EXPORTS:
        return _resolve(name)
    raise AttributeError(f"module 'moecarve' has no attribute {name!r}")


class _Package(types.ModuleType):
    """carve, condense and finetune name both a function and a submodule; importing the submodule
    sets the package attribute to the module, so these names resolve to the functions first."""

    _FUNCTIONS = frozenset({"carve", "condense", "finetune"})

    def __getattribute__(self, name: str):
        if name in _Package._FUNCTIONS:
            return _resolve(name)
        return super().__getattribute__(name)


sys.modules[__name__].__class__ = _Package

if TYPE_CHECKING:  # what static tools see
    from .calibration import load_windows
    from .carve import CarveReport, carve
    from .condense import CondenseConfig, CondenseReport, condense
    from .config import CalibConfig, CarveConfig, ConfigError
    from .errors import MoecarveError
    from .eval.perplexity import eval_perplexity
    from .eval.tasks import TaskConfig, run_tasks
    from .finetune import FinetuneConfig, FinetuneReport, finetune
    from .io.save import load, save
    from .modules.fast import use_kernels
    from .stream import carve_streamed
