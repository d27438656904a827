"""The package layout, the one part of the build pyproject.toml cannot say.

The Hydra configs stay at the repository root (`sweeps/`, where the clone and an editable
install read them) and ship inside the package as `moe_bench/sweeps/` (package data), so an
installed wheel runs from any folder; `moe_bench.config_dir()` finds them in either place.
pyproject's automatic discovery cannot map a folder outside a package into it, so the packages
are discovered here: code, data-only folders (report templates, config groups) included.
"""

from setuptools import find_namespace_packages, setup

CODE = find_namespace_packages(include=["variants*", "moe_bench*"])
CONFIGS = ["moe_bench." + name for name in find_namespace_packages(include=["sweeps*"])]

setup(
    packages=CODE + CONFIGS,
    package_dir={"moe_bench.sweeps": "sweeps"},
    package_data={
        "moe_bench.report.templates": ["*"],
        **{name: ["*.yaml"] for name in CONFIGS},
    },
)
