"""The Hugging Face classes of a carved model: its own config class and causal-LM class.

A carved folder names its own architecture: config.json says model_type "moecarve_llama",
architectures ["MoeCarveLlamaForCausalLM"] and maps AutoConfig and AutoModelForCausalLM to
modeling_moecarve.py. Plain `AutoModelForCausalLM.from_pretrained(dir)` then stops with
transformers' own request for `trust_remote_code=True`, instead of loading the source
architecture with freshly initialised FFNs in place of the carved ones.

The carved classes subclass the source classes (LlamaConfig, LlamaForCausalLM, ...) and change
only the model type and the FFN modules, so a carved model computes with transformers' own
attention, norms and generation code.

This file imports only torch, transformers and the module files before it (moe.py, condensed.py):
io/remote.py concatenates them into every carved folder's self-contained modeling_moecarve.py,
dropping the `from .` imports (their names are then in scope).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

from .moe import install_modules

MODEL_FILE = "modeling_moecarve.py"

# Fast paths of the carved classes' generate(), filled where moecarve is installed
# (moecarve.runtime.hf.register, called by moecarve's own loader and by the last lines of a carved
# folder's modeling file):
#   "generate"  (model, args, kwargs) -> output, or None where the call needs transformers' generate;
#   "kernels"   model -> a context manager under which the carved layers' forward runs the fast kernels
#               (transformers' generate then decodes with them).
# Empty, the classes compute with the reference code (a folder used without moecarve). forward()
# itself always runs the reference code unless moecarve.use_kernels binds the kernels.
FAST_PATHS: dict[str, Callable] = {}
MODEL_TYPE_PREFIX = "moecarve_"  # a carved model's model_type: "moecarve_" + its source's


def carved_name(name: str) -> str:
    """LlamaForCausalLM -> MoeCarveLlamaForCausalLM (the same for config classes)."""
    return f"MoeCarve{name}"


def source_model_type(model_type: str) -> str:
    """The source architecture of a model type: "moecarve_llama" -> "llama" ("llama" stays "llama")."""
    return model_type.removeprefix(MODEL_TYPE_PREFIX)


def auto_map(base: type) -> dict[str, str]:
    """config.json's auto_map for a model carved from the transformers class `base`."""
    module = MODEL_FILE.removesuffix(".py")
    return {
        "AutoConfig": f"{module}.{carved_name(base.config_class.__name__)}",
        "AutoModelForCausalLM": f"{module}.{carved_name(base.__name__)}",
    }


_CONFIG_CLASSES: dict[type, type] = {}


def carved_config_class(base_config: type) -> type:
    """The config class of a carved model: `base_config` (e.g. LlamaConfig) under model_type
    "moecarve_<type>", with the same fields; one class per source config class."""
    if base_config not in _CONFIG_CLASSES:
        attrs = {"model_type": MODEL_TYPE_PREFIX + base_config.model_type, "__module__": __name__}
        _CONFIG_CLASSES[base_config] = type(carved_name(base_config.__name__), (base_config,), attrs)
    return _CONFIG_CLASSES[base_config]


def carved_config(config, base: type):
    """A copy of `config` (the source class's config plus its `moecarve` entry) as the carved
    config class, naming the carved classes in `architectures` and `auto_map`."""
    out = copy.deepcopy(config)
    out.__class__ = carved_config_class(base.config_class)  # a subclass that adds no field: same attributes
    out.architectures = [carved_name(base.__name__)]
    out.auto_map = auto_map(base)
    return out


def write_config(config, folder: str | Path, base: type) -> None:
    """config.json of a carved folder, the one place it is written (moecarve.save, the streamed
    carve, and save_pretrained of a loaded carved model)."""
    carved_config(config, base).save_pretrained(folder)


def carved_lm_class(base: type, modeling_source: Callable[[], str] | None = None) -> type:
    """A subclass of the transformers causal-LM class `base` whose FFNs are the carved modules
    listed in `config.moecarve["modules"]`; weights then load through the ordinary from_pretrained.

    Its save_pretrained writes a folder that reloads: the carved config.json and modeling_moecarve.py.
    modeling_source returns that file's text; by default the text of the file this code lives in,
    which inside modeling_moecarve.py is the file itself (moecarve passes the assembled file).
    """
    source = modeling_source or (lambda: Path(__file__).read_text())

    class Carved(base):
        config_class = carved_config_class(base.config_class)

        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            install_modules(self, config.moecarve["modules"])

        def generate(self, *args, use_runtime: bool = True, **kwargs):
            """transformers' generate, served by moecarve's decode runtime where it implements the
            call, else decoding with moecarve's fast kernels; use_runtime=False: the reference code."""
            if use_runtime and "generate" in FAST_PATHS:
                out = FAST_PATHS["generate"](self, args, kwargs)
                if out is not None:
                    return out
            if use_runtime and "kernels" in FAST_PATHS:
                with FAST_PATHS["kernels"](self):
                    return super().generate(*args, **kwargs)
            return super().generate(*args, **kwargs)

        def save_pretrained(self, save_directory, *args, **kwargs):
            super().save_pretrained(save_directory, *args, **kwargs)
            if kwargs.get("is_main_process", True):
                write_config(self.config, save_directory, base)
                (Path(save_directory) / MODEL_FILE).write_text(source())

    Carved.__name__ = Carved.__qualname__ = carved_name(base.__name__)
    return Carved
