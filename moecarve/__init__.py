"""moecarve: carve dense LLMs into Mixture-of-Experts models without pre-training.

    import moecarve
    report = moecarve.carve(model, moecarve.CarveConfig.from_string("S2A2E8"), windows)
    moecarve.save(model, "out/carved", tokenizer=tok, report=report)
    model = moecarve.load("out/carved")
"""

from .calibration import load_windows
from .carve import CarveReport, carve
from .config import CalibConfig, CarveConfig, ConfigError
from .errors import MoecarveError
from .io.save import load, save

__all__ = [
    "CalibConfig",
    "CarveConfig",
    "CarveReport",
    "ConfigError",
    "MoecarveError",
    "carve",
    "load",
    "load_windows",
    "save",
]
__version__ = "0.1.0"
