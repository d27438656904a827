"""The task registry: the `TASK` object of every module of `moe_bench.tasks`, by name.

Adding a task is its module (`moe_bench/tasks/<name>.py`, defining `TASK = Task(name=<name>,
...)`) plus its YAML (`sweeps/task/<name>.yaml`, composing `/schema/task/<name>`): the registry
finds the module by walking the package (`moe_bench.tasks.__path__`), so no list names the
tasks. Every module there must define a `Task` named as its file; anything else fails loudly
when the registry is built, and an unknown `task=` name fails with the known names.

`register()` puts each task's config dataclass in Hydra's ConfigStore under `schema/task/`
(importing this module does; `moe_bench.compose` and the app import it before composing).
"""

from __future__ import annotations

import importlib
import pkgutil

from hydra.core.config_store import ConfigStore

import moe_bench.tasks
from moe_bench.task import Task


def discover() -> dict[str, Task]:
    """Every task module of the `moe_bench.tasks` package, imported, by name (sorted)."""
    package = moe_bench.tasks
    found: dict[str, Task] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        task = getattr(module, "TASK", None)
        if not isinstance(task, Task):
            raise ValueError(
                f"{module.__file__} defines no TASK (a moe_bench.task.Task): every module of "
                f"{package.__name__} is one task"
            )
        if task.name != info.name:
            raise ValueError(
                f"{module.__file__} defines task {task.name!r}; a task's module is named as "
                f"the task ({info.name}.py holds task {info.name!r})"
            )
        found[task.name] = task
    return found


TASKS: dict[str, Task] = discover()


def names() -> list[str]:
    return list(TASKS)


def lookup(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"task={name!r} is not one of {', '.join(map(repr, TASKS))}")
    return TASKS[name]


def register() -> None:
    """Put every task's config dataclass in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    for name, task in TASKS.items():
        cs.store(group="schema/task", name=name, node=task.config)


register()
