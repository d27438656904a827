"""A job's config identity: the one home of what makes two jobs "the same config".

Torch-free (the report, compare and claims import it). Resume compares config keys
(`config_key`, `config_hash`); the report groups jobs into arms by the same columns minus the
seed.

Column families of a row (docs/contract.md §5):
- config columns: `variant, task, backend, device, dtype, seed` and every dotted config value
  (`model.tokens`, `variant.top_k`, ...): what was asked, hence the identity;
- `DERIVED`: counts the code derives from the config (a change in how they are counted is a
  code change, not another config);
- card columns (`env.*`, `card.*`, written on a job's closing `job` row): where and how the job
  ran, and what its task asks; never part of the identity.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

# base columns left out of a job's config key: counts derived from the config by the code
DERIVED = ("params_total", "params_active", "flops_per_token", "leaks_future_tokens")
# variant fields derived from the model group (iso-compute) unless a value is given
SIZE_FIELDS = ("num_experts", "expert_hidden", "top_k", "d_ff")
# prefixes of the run card's columns: describe the run, never identify its config
CARD_PREFIXES = ("env.", "card.")


def json_value(value: Any) -> Any:
    """JSON-ready cell: non-finite floats become null, tensors and numpy scalars Python."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# the variants that gained `jitter_eps` with router_grad=sparsemixer (SparseMixer's band);
# switch (input jitter) and phimoe had theirs before
JITTER_EPS_ADDED = (
    "deepseek_moe", "deepseek_v2", "deepseek_v3", "deepseek_v4", "gpt_oss", "gshard", "mixtral",
    "noisy_topk", "olmoe", "qwen3_moe", "qwen3_next", "sinkhorn", "xmoe",
)  # fmt: skip

# config fields added after results were first written: (the value that computes what the code
# before them computed, the variants that gained them; None: every job that has the column). At
# that value the column is left out of the key, so folders written before resume as the same
# config and their rows join the same arms as new ones; any other value is part of the key.
ADDED_DEFAULTS: dict[str, tuple[Any, tuple[str, ...] | None]] = {
    "variant.router_grad": ("topk", None),  # variants/contract/router_grad.py
    "variant.default_moe_decay": (0.9, None),
    "variant.jitter_eps": (0.01, JITTER_EPS_ADDED),
    "task.init_from": (None, None),  # checkpoints and upcycling (moe_bench/upcycle.py)
    "task.upcycle": ("copy", None),
    "task.upcycle_noise": (0.0, None),
    "task.save": (False, None),
    "model.checkpoint": (False, None),  # activation checkpointing (variants/contract/recompute.py)
    "task.router_init_scale": (None, None),  # causes and speed options (moe_bench/causes.py)
    "task.eval_capacity": (True, None),
    "task.fused_optimizer": (False, None),
    "task.compile": (False, None),
    "variant.z_loss_coef": (0.0, ("deepseek_moe",)),  # switch and gshard had it before
    "task.trace_every": (0, None),  # routing traces (moe_bench/trace_recorder.py)
    "task.trace_layers": (None, None),
    "task.trace_router": (True, None),
    "variant.score": ("sigmoid", ("deepseek_v3",)),  # released models' scores (deepseek_v3.py)
}


def at_added_default(name: str, value: Any, variant: Any = None) -> bool:
    """Whether `name` is an added field (`ADDED_DEFAULTS`) of `variant` holding the value the
    code before it computed."""
    if name not in ADDED_DEFAULTS:
        return False
    default, gained = ADDED_DEFAULTS[name]
    return (gained is None or variant in gained) and canonical(value) == canonical(default)


def config_key(columns: dict[str, Any]) -> dict[str, Any]:
    """The values that identify a job's results: its base columns minus derived counts and
    minus added fields at their `ADDED_DEFAULTS` value."""
    variant = columns.get("variant")
    return {
        k: json_value(v)
        for k, v in columns.items()
        if k not in DERIVED
        and not k.startswith(CARD_PREFIXES)
        and not at_added_default(k, v, variant)
    }


def config_hash(key: dict[str, Any]) -> str:
    """A stable hash of a config key: sha256 of its sorted JSON."""
    text = json.dumps(key, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- arms: what a comparison compares ---------------------------------------------------------

# base columns that are config (the rest of a row's undotted columns are measurements)
CONFIG_BASE = ("variant", "task", "backend", "device", "dtype")
# last dotted parts of keys that say where or how often a job ran, never what ran
RUN_ONLY = ("seed", "overwrite", "out_dir", "output_dir")
# how a label spells a null value of a field whose null has a name
NULL_WORDS = {"capacity_factor": "dropless"}
LABEL_SEPARATOR = " · "
# key of an arm of reference rows (a race's dense reference, the base of its ratios): never a
# config column, added by the report; its label is the rest's with " (reference)"
REFERENCE = "reference"


def canonical(value: Any) -> Any:
    """One spelling per config value whichever file it came from: a JSON list and its CSV
    text, 3 and 3.0 and "3", None and NaN."""
    value = json_value(value)
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return value
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return int(value) if float(value).is_integer() else float(value)
    return str(value)


def is_config_column(name: str) -> bool:
    """Whether a row column is part of a job's config (not a measurement, count or card)."""
    if name.startswith(CARD_PREFIXES) or name in DERIVED:
        return False
    return name in CONFIG_BASE or name == "seed" or "." in name


def arm_key(columns: dict[str, Any]) -> dict[str, Any]:
    """A job's arm: its config key (`config_key`) restricted to config columns, minus the seed
    and run-only keys, values in one spelling. Jobs of one arm differ only in their seed."""
    return {
        k: canonical(v)
        for k, v in config_key(columns).items()
        if is_config_column(k) and k.split(".")[-1] not in RUN_ONLY
    }


def arm_hash(columns: dict[str, Any]) -> str:
    return config_hash(arm_key(columns))


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    return str(value)


def arm_labels(arms: dict[str, dict[str, Any]]) -> dict[str, str]:
    """arm id -> label, from the keys that vary between arms of the same variant and task:
    `switch · capacity_factor=1.0`, `switch · dropless`, `deepseek_v3 · bias_update_rate=0`; a
    variant with one arm keeps its bare name. The variant's derived sizes (SIZE_FIELDS) are
    left out where another of its fields varies (granularity sets them), and a key whose value
    repeats an earlier key's in every arm (`backend` and `variant.backend`) is said once. An arm
    keyed `reference` (a race's reference rows) is labelled as the rest with " (reference)":
    `dense (reference)` beside a raced `dense`."""
    groups: dict[tuple, list[str]] = {}
    for arm, key in arms.items():
        groups.setdefault((key.get("variant"), key.get("task")), []).append(arm)
    labels = {}
    for (variant, _), members in groups.items():
        names = sorted(
            {k for m in members for k in arms[m]} - {"variant", "task", "variant.name", REFERENCE}
        )
        varying = [n for n in names if len({repr(arms[m].get(n)) for m in members}) > 1]
        sizes = {f"variant.{s}" for s in SIZE_FIELDS}
        if any(n.startswith("variant.") and n not in sizes for n in varying):
            varying = [n for n in varying if n not in sizes]
        seen: set[tuple] = set()  # a key that repeats another's value in every arm is said once
        for name in list(varying):
            values = tuple(repr(canonical(arms[m].get(name))) for m in members)
            if values in seen:
                varying.remove(name)
            seen.add(values)
        short = [n.split(".")[-1] for n in varying]
        shown = [s if short.count(s) == 1 else n for s, n in zip(short, varying)]
        for m in members:
            parts = []
            for name, text in zip(varying, shown):
                value = arms[m].get(name)
                default = ADDED_DEFAULTS.get(name, (None,))[0]
                if value is None and default is not None:  # left out: at its added default
                    parts.append(f"{text}={_shown(canonical(default))}")
                elif value is None:
                    parts.append(NULL_WORDS.get(text, f"{text}=none"))
                else:
                    parts.append(f"{text}={_shown(canonical(value))}")
            label = LABEL_SEPARATOR.join([str(variant), *parts])
            labels[m] = label + (" (reference)" if arms[m].get(REFERENCE) else "")
    return labels
