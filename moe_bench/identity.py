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


def config_key(columns: dict[str, Any]) -> dict[str, Any]:
    """The values that identify a job's results: its base columns minus derived counts."""
    return {
        k: json_value(v)
        for k, v in columns.items()
        if k not in DERIVED and not k.startswith(CARD_PREFIXES)
    }


def config_hash(key: dict[str, Any]) -> str:
    """A stable hash of a config key: sha256 of its sorted JSON."""
    text = json.dumps(key, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
