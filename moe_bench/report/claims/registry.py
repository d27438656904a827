"""The claims registry: paper results reproduced as small controlled comparisons.

A claim names a paper's result (paper, table or figure, the number it reports), a treatment
and a control (a variant and config values each, read from the result rows' columns), the
measures the paper compares and which way is better. The claims stage (`report.claims`) pairs
their jobs by seed and gives each a verdict; `+experiment=claims` (CPU) and
`+experiment=claims_gpu` run them all. This file is data: the papers' statements name their
variants; no code path of the report branches on a name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from moe_bench import schema

from ..frames import ARM, column, summary_rows
from ..sections import job_specialisation

# --- measures: one number per job, from its rows ----------------------------------------------


def _last(rows: pd.DataFrame) -> float:
    """The value at the last recorded step (NaN without rows)."""
    rows = rows.dropna(subset=["value"])
    if rows.empty:
        return math.nan
    return float(rows.sort_values("step", na_position="first")["value"].iloc[-1])


def final_val_loss(rows: pd.DataFrame) -> float:
    return _last(rows[rows["metric"] == schema.VAL_LOSS.name])


def final_max_vio_global(rows: pd.DataFrame) -> float:
    """MaxVio_global over the validation set at the last evaluation, mean over MoE layers."""
    return _last(summary_rows(rows, schema.MAX_VIO_GLOBAL.name))


def mean_drop_fraction(rows: pd.DataFrame) -> float:
    """Dropped / demanded assignments in training, mean over the logged steps (and layers)."""
    values = summary_rows(rows, schema.DROP_FRACTION.name)["value"].dropna()
    return float(values.mean()) if len(values) else math.nan


def domain_specialisation(rows: pd.DataFrame) -> float:
    """JS divergence (bits) between the prose and code expert loads at the last evaluation,
    mean over MoE layers (`sections.job_specialisation`'s math)."""
    per_layer = job_specialisation(rows)
    return float(per_layer["js"].mean()) if not per_layer.empty else math.nan


@dataclass(frozen=True)
class Measure:
    label: str
    better: str  # "min" or "max": the direction the paper says is better
    value: Callable[[pd.DataFrame], float]  # the rows of one job -> its number
    digits: int = 3


VAL_LOSS = Measure("final val loss (nats/byte)", "min", final_val_loss)
MAX_VIO = Measure("MaxVio_global", "min", final_max_vio_global)
DROPS = Measure("dropped fraction (training)", "min", mean_drop_fraction, 4)
SPECIALISATION = Measure("prose/code JS divergence (bits)", "max", domain_specialisation)


@dataclass(frozen=True)
class Check:
    """One measure of a claim. `must`: "win" (the paired difference must favour the treatment
    beyond the noise) or "not worse" (it must only not favour the control beyond the noise)."""

    measure: Measure
    must: str = "win"


# --- claims -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    paper: str
    where: str  # table or figure
    reports: str  # what the paper reports there


Match = Any  # a value, a tuple of allowed values (None: the column is absent), or a predicate


@dataclass(frozen=True)
class Side:
    """Jobs of one side of a claim: this variant, with these config columns."""

    variant: str
    where: Mapping[str, Match] = field(default_factory=dict)
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or self.variant

    def matches(self, job: Mapping[str, Any]) -> bool:
        """Whether a job (its config columns, as a record) is this side."""
        return job["variant"] == self.variant and all(
            _matches(job.get(key), want) for key, want in self.where.items()
        )


def _matches(value: Any, want: Match) -> bool:
    missing = value is None or (isinstance(value, float) and math.isnan(value))
    if callable(want):
        return not missing and bool(want(value))
    allowed = want if isinstance(want, tuple) else (want,)
    return any((missing if a is None else (not missing and value == a)) for a in allowed)


@dataclass(frozen=True)
class Claim:
    id: str
    title: str
    source: Source
    treatment: Side
    control: Side
    checks: tuple[Check, ...]
    setting: str  # our setting, one line
    steps_to_control_loss: bool = False  # also: the step each seed first reaches the control's


DEEPSEEK_MOE_DENSE = Source(
    "Dai et al. 2024, DeepSeekMoE (arXiv:2401.06066)",
    "Table 1 (validation experiments, 100B tokens)",
    "DeepSeekMoE 2.0B (0.3B active) against the dense baseline of the same table: the "
    "lowest Pile loss of the table (1.808) and ahead of dense on its benchmarks",
)
SWITCH = Source(
    "Fedus et al. 2021, Switch Transformer (arXiv:2101.03961)",
    "Sec. 3.1-3.2 (Figs. 4-5), Table 1",
    "Switch-Base 64E reaches T5-Base's step-450k quality at step 60k (7.5x in steps; 1/7 the "
    "time, Fig. 5); Table 1, 100k steps: T5-Base -1.731 vs Switch-Base cf 1.0 -1.561 "
    "neg. log perp.",
)
CLAIMS = (
    Claim(
        "1a",
        "Switch (top-1) beats dense at equal active FLOPs",
        SWITCH,
        Side("switch", {"variant.capacity_factor": 1.0}, "switch cf 1.0"),
        Side("dense"),
        (Check(VAL_LOSS),),
        "switch (top-1, capacity factor 1.0) vs the dense FFN of the same active FLOPs",
        steps_to_control_loss=True,
    ),
    Claim(
        "1b",
        "DeepSeekMoE beats dense at equal active FLOPs",
        DEEPSEEK_MOE_DENSE,
        Side("deepseek_moe", {"variant.granularity": 4, "variant.balance_scope": "micro_batch"}),
        Side("dense"),
        (Check(VAL_LOSS),),
        "deepseek_moe (m=4, 1 shared) vs the dense FFN of the same active FLOPs",
        steps_to_control_loss=True,
    ),
    Claim(
        "1c",
        "Switch (top-1) without capacity drops beats dense at equal active FLOPs",
        SWITCH,
        Side("switch", {"variant.capacity_factor": (None,)}, "switch dropless"),
        Side("dense"),
        (Check(VAL_LOSS),),
        "switch (top-1, dropless) vs the dense FFN of the same active FLOPs: 1a without drops",
        steps_to_control_loss=True,
    ),
    Claim(
        "2",
        "Fine-grained + shared experts beat GShard top-2 at equal total and active parameters",
        Source(
            "Dai et al. 2024, DeepSeekMoE (arXiv:2401.06066)",
            "Tables 1-2",
            "Pile loss: GShard 1.867 vs DeepSeekMoE 1.808 (both 2.0B total, 0.3B active, 100B "
            "tokens); DeepSeekMoE ahead on all 10 benchmarks; Table 2: GShard x1.5 also 1.808",
        ),
        Side("deepseek_moe", {"variant.granularity": 4, "variant.balance_scope": "micro_batch"}),
        Side("gshard"),
        (Check(VAL_LOSS),),
        "deepseek_moe (m=4: 63 routed top-7 + 1 shared) vs gshard (16 experts, top-2)",
    ),
    Claim(
        "2b",
        "Finer expert segmentation helps (granularity 4 vs 1, both with a shared expert)",
        Source(
            "Dai et al. 2024, DeepSeekMoE (arXiv:2401.06066)",
            "Fig. 3",
            "normalised scores on 6 benchmarks rise from 1 shared + 1/15 routed to 1+3/31 to "
            "1+7/63 at equal total and active params (bar chart: no values, no Pile loss)",
        ),
        Side("deepseek_moe", {"variant.granularity": 4}, "deepseek_moe m=4"),
        Side("deepseek_moe", {"variant.granularity": 1}, "deepseek_moe m=1"),
        (Check(VAL_LOSS),),
        "deepseek_moe m=4 vs m=1, 1 shared expert each (GPU preset only)",
    ),
    Claim(
        "3",
        "Loss-free bias balancing lowers MaxVio_global at equal or better loss",
        Source(
            "Wang et al. 2024, Auxiliary-Loss-Free Load Balancing (arXiv:2408.15664)",
            "Table 2",
            "aux loss (alpha 1e-3) vs loss-free: 1B ppl 9.56 vs 9.50, MaxVio_global 0.72 vs "
            "0.04; 3B ppl 7.97 vs 7.92, MaxVio_global 0.52 vs 0.04",
        ),
        Side("deepseek_v3", {"variant.bias_update_rate": lambda v: v > 0}, "bias update on"),
        Side("deepseek_v3", {"variant.bias_update_rate": 0.0}, "bias update off"),
        (Check(MAX_VIO), Check(VAL_LOSS, "not worse")),
        "deepseek_v3 with bias updates (rate 1e-3) vs without, sequence loss 1e-4 on both",
    ),
    Claim(
        "4",
        "A larger capacity factor drops fewer tokens and reaches a lower loss",
        Source(
            "Fedus et al. 2021, Switch Transformer (arXiv:2101.03961)",
            "Table 1",
            "Switch-Base at 100k steps: cf 2.0 -1.554 neg. log perp., 860 ex/s; cf 1.0 -1.561, "
            "1000 ex/s (cf 1.25 -1.553, 910); hours to -1.50: 72.8 (cf 2.0) vs 62.8 (cf 1.0)",
        ),
        Side("switch", {"variant.capacity_factor": 2.0}, "switch cf 2.0"),
        Side("switch", {"variant.capacity_factor": 1.0}, "switch cf 1.0"),
        (Check(DROPS), Check(VAL_LOSS)),
        "switch at capacity factor 2.0 vs 1.0 (speed not judged: CPU timings are shared)",
    ),
    Claim(
        "4b",
        "Dropless routing drops nothing and reaches a lower loss than capacity factor 1.0",
        Source(
            "Fedus et al. 2021, Switch Transformer (arXiv:2101.03961)",
            "Table 1",
            "no dropless row; Switch-Base at 100k steps: cf 1.0 -1.561, cf 1.25 -1.553, cf 2.0 "
            "-1.554 neg. log perp.; Sec. 2.2: dropped tokens 'typically < 1%'",
        ),
        Side("switch", {"variant.capacity_factor": (None,)}, "switch dropless"),
        Side("switch", {"variant.capacity_factor": 1.0}, "switch cf 1.0"),
        (Check(DROPS), Check(VAL_LOSS)),
        "switch without capacity vs capacity factor 1.0",
    ),
    Claim(
        "5a",
        "Expert choice converges faster than token choice at equal active compute",
        Source(
            "Zhou et al. 2022, Expert Choice routing (arXiv:2202.09368)",
            "abstract",
            "more than 2x faster training convergence than top-1 and top-2 gating",
        ),
        Side("expert_choice", {"variant.selection_scope": ("batch", None)}, "expert_choice"),
        Side("gshard"),
        (Check(VAL_LOSS),),
        "expert_choice (capacity 2, selection over the batch) vs gshard top-2",
    ),
    Claim(
        "5b",
        "Part of expert choice's gain in a causal LM is the future-token leak",
        Source(
            "Zhou et al. 2022 (arXiv:2202.09368) evaluate non-causal settings",
            "Sec. 3.2",
            "experts choose over the batch, later tokens of a sequence included",
        ),
        Side("expert_choice", {"variant.selection_scope": ("batch", None)}, "batch (leaks)"),
        Side("expert_choice", {"variant.selection_scope": "position"}, "position (causal)"),
        (Check(VAL_LOSS),),
        "expert_choice selecting over the whole batch vs among tokens at the same position",
    ),
    Claim(
        "6",
        "Global-batch balance gives more domain specialisation than micro-batch balance",
        Source(
            "Qiu et al. 2025, global-batch load balance (arXiv:2501.11873)",
            "Table 1, Sec. 4.2 (Fig. 1b)",
            "3.4A0.6B, 120B tokens: Avg PPL 8.167 micro-batch LBL (Balance BSZ 4) vs 8.038 global "
            "(512); expert selection freq. none > 0.15 (micro) vs many > 0.2 on SFT-Math (global)",
        ),
        Side("deepseek_moe", {"variant.balance_scope": "global_batch"}, "global batch"),
        Side("deepseek_moe", {"variant.balance_scope": "micro_batch"}, "micro batch"),
        (Check(SPECIALISATION), Check(VAL_LOSS, "not worse")),
        "deepseek_moe, f counted over the step's global batch vs each micro-batch (gradient "
        "accumulation: task.micro_batch_size)",
    ),
    Claim(
        "7",
        "Default MoE's dense router gradient beats top-K's at equal steps",
        Source(
            "Panda et al. 2025, Default MoE (arXiv:2504.12463)",
            "abstract, Fig. 1",
            "outperforms standard TopK routing in a variety of settings; a 2B-parameter MoE "
            "after 320B FineWeb-Edu tokens ahead of TopK on its lm-eval-harness benchmarks",
        ),
        Side("mixtral", {"variant.router_grad": "default_moe", "task.init_from": (None,)}),
        Side("mixtral", {"variant.router_grad": "topk", "task.init_from": (None,)}),
        (Check(VAL_LOSS),),
        "mixtral top-2, router_grad default_moe (EMA decay 0.9) vs topk, same weights at init",
    ),
    Claim(
        "8",
        "Sparse upcycling beats continued dense training at equal extra steps",
        Source(
            "Komatsuzaki et al. 2022, Sparse Upcycling (arXiv:2212.05055)",
            "abstract",
            "upcycled T5 Base/Large/XL and ViT B/L significantly outperform their dense "
            "counterparts on SuperGLUE and ImageNet, using only ~50% of the initial dense "
            "pretraining sunk cost",
        ),
        Side("mixtral", {"task.init_from": bool}, "upcycled mixtral (copy)"),
        Side("dense", {"task.init_from": bool}, "dense continued"),
        (Check(VAL_LOSS),),
        "from one dense parent: mixtral with 8 copies of its FFN (top-2, so 2x dense's active "
        "FFN FLOPs) vs the dense LM, the same extra steps each",
    ),
    Claim(
        "9",
        "SparseMixer's sampled selection and gradient beat plain top-2 at equal compute",
        Source(
            "Liu et al. 2024, GRIN (arXiv:2409.12136)",
            "Sec. 3.1, Fig. 2 (16x0.9B MoE, top-2, 2.5T tokens, MMLU 5-shot)",
            "GShard's top-2 ahead over the first 0.5T tokens, SparseMixer-v2 ahead later (no "
            "number in the text; the figure reads about 0.59 vs 0.57 MMLU at 2.5T)",
        ),
        Side("mixtral", {"variant.router_grad": "sparsemixer", "task.init_from": (None,)}),
        Side("mixtral", {"variant.router_grad": "topk", "task.init_from": (None,)}),
        (Check(VAL_LOSS),),
        "mixtral top-2, router_grad sparsemixer (jitter_eps 0.01) vs topk, same weights at init",
    ),
    Claim(
        "10",
        "Routing by a fixed hash of the token id matches or beats learned top-1 routing",
        Source(
            "Roller et al. 2021, Hash Layers (arXiv:2106.04426)",
            "ParlAI project page by the authors (projects/params_vs_compute), its figure",
            "on pushshift.io Reddit the hash layer outperforms the learned Switch baseline, "
            "especially with more experts (no number in the text; the figure, read by eye: "
            "about 23.2 vs 23.7 perplexity at 64 experts, 24.0 for both at 16)",
        ),
        Side("hash"),
        Side("switch", {"variant.capacity_factor": (None,)}, "switch dropless"),
        (Check(VAL_LOSS, "not worse"),),
        "hash (top-1 by a random byte -> expert table) vs switch dropless (learned top-1), "
        "the same experts and widths",
    ),
)


# --- what the papers do that this run does not ------------------------------------------------


def measured_drops(frame: pd.DataFrame, jobs: pd.DataFrame) -> list[str]:
    """One line per capacity-limited setting of this sweep that dropped assignments: the share
    it dropped in training (mean over steps and seeds), beside Switch's "typically < 1%"."""
    found = []
    by_job = dict(tuple(frame.groupby("job_dir", sort=False)))
    cf = "variant.capacity_factor"
    if cf not in jobs:
        return []
    for (arm, factor), part in jobs.dropna(subset=[cf]).groupby([ARM, cf]):
        drops = [mean_drop_fraction(by_job[j]) for j in part.index]
        drops = [d for d in drops if not math.isnan(d)]
        if drops and max(drops) > 0:  # expert choice's capacity drops nothing by construction
            found.append(
                f"Measured: {arm} at capacity factor {factor:g} dropped "
                f"{100 * float(np.mean(drops)):.1f}% of its assignments in training (mean over "
                f"steps, {len(drops)} seeds); Switch (Sec. 2.2) reports typically < 1%."
            )
    return found


def gaps(frame: pd.DataFrame, jobs: pd.DataFrame) -> list[str]:
    """What the papers do that this run does not: facts from the code and the rows' config
    (`jobs`: one row per job, its config columns, as the claims stage's `jobs_table`)."""
    job = jobs.iloc[0]

    def get(name: str) -> Any:
        return job.get(name, "?")

    tokens = get("task.batch_size") * get("task.seq_len") if "task.seq_len" in job else "?"
    return [
        f"Scale: a byte-level LM of width {get('model.d_model')} with {get('task.n_layers')} "
        f"layers, {get('task.steps')} steps of {tokens} tokens; the papers train models of "
        "10^8 to 10^12 parameters on billions of tokens or more.",
        f"Schedule: AdamW, peak lr {get('task.lr')}, {get('task.warmup_steps')} linear warm-up "
        "steps, cosine decay to 10% (moe_bench/tasks/convergence.py); not tuned per variant.",
        "Router init: nn.Linear's default (Kaiming uniform, std 1/sqrt(3 D), "
        "variants/contract/routing.py); expert weights normal with std 1/sqrt(fan-in) "
        "(variants/compute/experts.py). Switch (Sec. 2.4) scales its initialisation down 10x.",
        "Router z-loss: off (z_loss_coef = 0 on switch and gshard); ST-MoE "
        "(arXiv:2202.08906) uses 1e-3. No input jitter (jitter_eps = 0).",
        "Capacity: switch and gshard drop over-capacity assignments in evaluation too "
        "(the dropped token keeps its residual only); deepseek_moe, deepseek_v3 and dense "
        "are dropless.",
        *measured_drops(frame, jobs),
        "Expert choice selects among all tokens of a forward, later tokens of a sequence "
        "included; its loss in this causal LM is not comparable (claim 5b measures the share).",
        *training_gaps(jobs),
    ]


def training_gaps(jobs: pd.DataFrame) -> list[str]:
    """Lines for the claims on how MoEs are trained, where this sweep ran them."""
    found = []
    if (column(jobs, "variant.router_grad") == "default_moe").any():
        found.append(
            "Default MoE: the stand-in enters the backward only (the forward is top-K's) and "
            "the EMA costs one extra forward of the routed experts per training step "
            "(variants/contract/router_grad.py); the paper's runs train 10^9-parameter MoEs."
        )
    if column(jobs, "task.init_from").notna().any():
        found.append(
            "Upcycling: the optimizer state is not carried over (the paper optionally copies "
            "it) and the child restarts warm-up and cosine decay; equal extra steps, not equal "
            "extra FLOPs (the upcycled MoE computes two full-width copies per token)."
        )
    return found
