"""The package itself: importing it is cheap, and its public names are the API's functions."""

from __future__ import annotations

import subprocess
import sys


def test_import_and_help_do_not_load_torch():
    code = (
        "import sys, moecarve; assert 'torch' not in sys.modules, 'import moecarve loaded torch';"
        "from moecarve.cli import build_parser; build_parser();"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'the CLI parser loaded torch';"
        "print('ok')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_public_names_are_the_functions_even_after_their_submodules_load():
    import moecarve
    import moecarve.carve  # noqa: F401  (the submodule shares the function's name)
    import moecarve.condense  # noqa: F401
    import moecarve.finetune  # noqa: F401
    from moecarve.carve import carve
    from moecarve.finetune import FinetuneConfig, finetune

    assert moecarve.carve is carve and moecarve.finetune is finetune and callable(moecarve.condense)
    assert moecarve.FinetuneConfig is FinetuneConfig
    assert set(moecarve.__all__) >= {"carve", "condense", "finetune", "load", "save", "CarveConfig", "use_kernels"}
    for name in moecarve.__all__:
        assert getattr(moecarve, name) is not None
