"""Where the Hydra configs are: the one place the app, `compose` and the tasks read them from.

Torch-free and importing nothing of moe_bench, so the package's facade can import it.
"""

from __future__ import annotations

from pathlib import Path


def config_dir() -> Path:
    """The Hydra config directory (`sweeps/`), the one place the app and `compose` read it from.

    An installed package (a wheel, `pip install .`) carries it as `moe_bench/sweeps/` (package
    data); in the clone (an editable install, or the clone on sys.path) it is `sweeps/` at the
    repository root, beside this package."""
    package = Path(__file__).resolve().parent
    installed = package / "sweeps"
    return installed if (installed / "config.yaml").is_file() else package.parent / "sweeps"
