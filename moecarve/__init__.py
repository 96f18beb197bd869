"""moecarve: carve dense LLMs into Mixture-of-Experts models without pre-training.

    import moecarve
    report = moecarve.carve(model, moecarve.CarveConfig.from_string("S2A2E8"), windows)
    moecarve.save(model, "out/carved", tokenizer=tok, report=report)
    model = moecarve.load("out/carved", kernels="auto")  # or moecarve.use_kernels(model) in memory
"""

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

__all__ = [
    "CalibConfig",
    "CarveConfig",
    "CarveReport",
    "CondenseConfig",
    "CondenseReport",
    "ConfigError",
    "FinetuneConfig",
    "FinetuneReport",
    "MoecarveError",
    "TaskConfig",
    "carve",
    "carve_streamed",
    "condense",
    "eval_perplexity",
    "finetune",
    "load",
    "load_windows",
    "run_tasks",
    "save",
    "use_kernels",
]
__version__ = "0.1.0"
