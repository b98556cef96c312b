"""mlx-dsv4: DeepSeek-V4 (Flash and Pro) on MLX.

Public API: `load`, `make_cache`, `ModelArgs`, `stream_generate`, `generate`, `Session`. Heavy
modules are imported on first use so that
`import mlx_dsv4` and `dsv4 --help` stay fast.
"""

from importlib.metadata import PackageNotFoundError, version

from .config import ConfigError, ModelArgs
from .threads import release_at_exit

release_at_exit()  # MLX asks every thread, the main one too, to free its streams before exit

try:
    __version__ = version("mlx-dsv4")  # pyproject.toml's, as installed: one place to bump it
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"

_LAZY = {
    "load": ("model.weights", "load"),
    "load_model": ("model.weights", "load_model"),
    "make_cache": ("model.cache", "make_cache"),
    "Model": ("model.model", "Model"),
    "stream_generate": ("generation.generate", "stream_generate"),
    "generate": ("generation.generate", "generate"),
    "Session": ("generation.session", "Session"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'mlx_dsv4' has no attribute {name!r}")


__all__ = ["ConfigError", "ModelArgs", "__version__", *_LAZY]
