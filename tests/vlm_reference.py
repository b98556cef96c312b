"""mlx-vlm 0.7.10's DeepSeek-V4.1 modules, imported without the rest of mlx-vlm (a test oracle).

`pip install --no-deps mlx-vlm==0.7.10` brings the source only; the package's own `__init__`
files import its whole stack (transformers, Pillow, requests, datasets...), which V4.1's model
files do not use. So the packages on the path to `models/deepseek_v41` are registered as empty
namespaces, and Pillow (imported at the top of `models/base.py`, used only for images) is
stubbed while they import, when absent. Tests that need the oracle skip when mlx-vlm is not installed.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest

VERSION = "0.7.10"


def load(module: str = "language"):
    """`mlx_vlm.models.deepseek_v41.<module>`, or a pytest skip when mlx-vlm is missing."""
    if not getattr(sys.modules.get("mlx_vlm"), "_dsv4_stub", False):
        spec = importlib.util.find_spec("mlx_vlm")
        if spec is None or not spec.submodule_search_locations:
            pytest.skip(f"mlx-vlm is not installed (pip install --no-deps mlx-vlm=={VERSION})")
        root = Path(spec.submodule_search_locations[0])
        for name, path in (("mlx_vlm", root), ("mlx_vlm.models", root / "models"),
                           ("mlx_vlm.models.deepseek_v4", root / "models" / "deepseek_v4"),
                           ("mlx_vlm.models.deepseek_v41", root / "models" / "deepseek_v41")):
            package = types.ModuleType(name)
            package.__path__ = [str(path)]
            package._dsv4_stub = True
            sys.modules[name] = package
    # The Pillow stub lives only while mlx-vlm's modules import: left in sys.modules it would
    # make transformers (the V4 oracle, later in the same run) believe Pillow is installed.
    stubs = []
    if "PIL" not in sys.modules and importlib.util.find_spec("PIL") is None:
        pil = types.ModuleType("PIL")
        pil.Image = types.ModuleType("PIL.Image")
        sys.modules.update({"PIL": pil, "PIL.Image": pil.Image})
        stubs = ["PIL", "PIL.Image"]
    try:
        return importlib.import_module(f"mlx_vlm.models.deepseek_v41.{module}")
    finally:
        for name in stubs:
            sys.modules.pop(name, None)
