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
# config columns added after results were written, with the value every older job ran with:
# left out of the key at that value, so a folder written before resumes as the same config
# (deepseek_v3's `score`, added with the released models' routings: older jobs were sigmoid)
ADDED_AT_DEFAULT = {"variant.score": "sigmoid"}


def json_value(value: Any) -> Any:
    """JSON-ready cell: non-finite floats become null, tensors and numpy scalars Python."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def config_key(columns: dict[str, Any]) -> dict[str, Any]:
    """The values that identify a job's results: its base columns minus derived counts (and
    minus columns added later while they hold the value older jobs ran with)."""
    return {
        k: json_value(v)
        for k, v in columns.items()
        if k not in DERIVED
        and not k.startswith(CARD_PREFIXES)
        and not (k in ADDED_AT_DEFAULT and v == ADDED_AT_DEFAULT[k])
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
                if value is None:
                    parts.append(NULL_WORDS.get(text, f"{text}=none"))
                else:
                    parts.append(f"{text}={_shown(canonical(value))}")
            label = LABEL_SEPARATOR.join([str(variant), *parts])
            labels[m] = label + (" (reference)" if arms[m].get(REFERENCE) else "")
    return labels
