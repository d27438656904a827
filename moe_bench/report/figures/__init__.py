"""The report's figures: each drawn from the frame of the table it illustrates.

A figure is a `FigureSpec` whose `draw(inputs)` returns the matplotlib figure and the values it
plots (`draw.Drawn`), or raises `Missing` saying which rows it lacked, so the report states what
it does not show instead of drawing empty axes. `FIGURES` lists them in report order;
`claim_figures` adds one per covered claim; `render` draws one into a self-contained SVG.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import pandas as pd

from . import claims, ep_scale, parallel, speed, training
from .draw import BAND_NOTE, Drawn, Inputs, Missing, arm_colors, render_svg

__all__ = [
    "FIGURES",
    "SCALE_FIGURES",
    "Drawn",
    "FigureSpec",
    "Inputs",
    "Missing",
    "arm_colors",
    "claim_figures",
    "render",
]

CI_NOTE = "error bars: 95% interval (Student's t over seeds, or one timed job's interval)"


class FigureSpec(NamedTuple):
    key: str
    title: str
    caption: str
    draw: Callable[[Inputs], Drawn]
    table: bool = False  # the plotted values shown in a table beside the figure


def render(spec: FigureSpec, inputs: Inputs) -> tuple[str, pd.DataFrame]:
    """The figure as an inline SVG element (ids unique to it) and the values it plots."""
    return render_svg(lambda: spec.draw(inputs), prefix=f"fig-{spec.key}")


FIGURES = (
    FigureSpec(
        "throughput-experts",
        "Tokens/s vs number of experts",
        "Tokens per second of the timed layer, one line per arm (its label without the "
        "number of experts), one panel per task and pass; an arm without experts (dense) is a "
        "dashed reference line; " + BAND_NOTE + ".",
        speed.throughput_vs_experts,
    ),
    FigureSpec(
        "throughput-tokens",
        "Tokens/s vs tokens per batch",
        "Tokens per second of the timed layer, one line per arm (its label without the batch "
        "size), one panel per task and pass; " + BAND_NOTE + ".",
        speed.throughput_vs_tokens,
    ),
    FigureSpec(
        "speed",
        "Tokens/s by arm",
        "The leaderboards' tokens/s cells, one bar per arm (no bar pools arms), one panel per "
        "task and pass; " + CI_NOTE + "; a log axis when bars span a decade or more.",
        speed.speed,
    ),
    FigureSpec(
        "efficiency",
        "TFLOP/s and share of the dense twin's rate",
        "Analytic FLOPs per token over the median time, and 1 / ratio to dense: the share of "
        "the rate of the dense FFN of the same active FLOPs timed interleaved in the same job "
        "(1 = as fast); " + CI_NOTE + ".",
        speed.efficiency,
    ),
    FigureSpec(
        "peak-memory",
        "Peak memory by arm",
        "The leaderboards' peak-memory cells (MiB), one bar per arm; " + CI_NOTE + ".",
        speed.memory,
    ),
    FigureSpec(
        "quality-cost",
        "Quality against cost",
        "Final validation loss (mean ± 95% CI over seeds) against the same table's tokens/s "
        "and ratio to dense, one point per arm; the dotted line is the Pareto frontier (no "
        "other arm is both faster and lower in loss).",
        training.quality_vs_cost,
    ),
    FigureSpec(
        "loss-step",
        "Loss vs step",
        "Training and validation loss (nats per byte; bits per byte = nats / ln 2), one line "
        "per arm, one panel per task; the train loss is an EMA over a faint raw line when "
        "there are many steps; " + BAND_NOTE + ".",
        training.loss_vs_step,
    ),
    FigureSpec(
        "loss-wall",
        "Loss vs wall time",
        "The same losses against wall-clock seconds since training started (mean over seeds at "
        "each step); the axis ends where the shortest run ends; " + BAND_NOTE + ".",
        training.loss_vs_wall,
    ),
    FigureSpec(
        "dynamics",
        "Aux loss, drops and dead experts vs step",
        "Routing during training, mean over layers: the weighted auxiliary loss, the share of "
        "demanded assignments dropped by capacity, and experts under 1% of the mean load; "
        "EMA-smoothed lines over faint raw ones when there are many steps.",
        training.training_dynamics,
    ),
    FigureSpec(
        "maxvio",
        "MaxVio_batch vs step",
        "E · max_i p_i − 1 per batch, mean over layers, one panel per task (and input domain); "
        "panels of jobs that never trained say so (untrained routers: arms with the same "
        "router draw the same line; markers and line styles tell them apart); 0 is perfect "
        "balance (Wang et al. 2024, Eq. 4); " + BAND_NOTE + ".",
        training.max_vio_vs_step,
    ),
    FigureSpec(
        "load-layers",
        "Expert load per layer (last step)",
        "Share of assignments each expert received in each layer, relative to a uniform share "
        "(1, white); red experts are overloaded, blue ones starved. One heatmap per arm, "
        "summed over seeds and domains, at the last recorded step.",
        training.load_heatmaps,
    ),
    FigureSpec(
        "load-steps",
        "Expert load over training steps",
        "The same share per recorded step (rows) for the first and last MoE layer of each arm, "
        "summed over seeds and domains, drawn without interpolation: how the load moves while "
        "the router trains.",
        training.load_over_steps,
    ),
    FigureSpec(
        "load-domains",
        "Expert load by domain (specialisation)",
        "Share of each domain's assignments per expert relative to uniform, summed over layers "
        "and seeds, one heatmap per arm. Distinct rows mean experts specialise by domain.",
        training.domain_load,
    ),
    FigureSpec(
        "ep-traffic",
        "Expert parallelism: traffic per token",
        "The leaderboard's traffic cells of one eval forward over task.ep_size ranks (exact "
        "counts), one bar per arm: ranks a token is sent to, off-rank bytes of dispatch and "
        "combine per token, the fraction of kept assignments whose expert is on another rank, "
        "and the received-token imbalance across ranks (1 = balanced). DeepSeek-V2 bounds "
        "ranks per token by max_devices (arXiv:2405.04434 Sec. 2.1.3).",
        parallel.ep_traffic,
    ),
    FigureSpec(
        "ep-rank-tokens",
        "Expert parallelism: rank-to-rank token matrix",
        "Token rows each source rank (row) sends to each destination rank (column) in one eval "
        "forward, one matrix per arm; the diagonal stays on its rank.",
        parallel.ep_rank_tokens,
    ),
    FigureSpec(
        "ep-imbalance",
        "Expert parallelism: received-token imbalance during training",
        "rank_imbalance per step of the task's short training run, one line per arm; balance "
        "losses (e.g. DeepSeek-V2's communication-balance loss, Sec. 2.1.4) pull it toward 1.",
        parallel.ep_imbalance_vs_step,
    ),
    FigureSpec(
        "claims-forest",
        "Claims: paired differences against zero",
        "Each claim's paired difference d (mean over seeds; > 0: the paper's direction) with its "
        "95% Student's t interval (n − 1 degrees of freedom), one panel per claims section; "
        "green: reproduced, red: contradicted, grey: inconclusive.",
        claims.forest,
    ),
)


# simulated expert parallelism (task=ep_sim): drawn after FIGURES, each with its table
SCALE_FIGURES = (
    FigureSpec(
        "ep-scale",
        "Simulated expert parallelism: stragglers, bytes and all-to-all time vs ranks",
        "A routing replayed over 8 to 1024 ranks (8 a node) by task=ep_sim, one line per "
        "routing rule (colour) and placement (line style), one column of panels per arm: the "
        "max / mean token rows a rank receives (1 = balanced), off-rank bytes of dispatch and "
        "combine per token, and the estimated dispatch + combine time (each exchange ends with "
        "its slowest rank; the machine model of docs/expert_parallel.md). Each point is the "
        "mean over the replayed steps and layers (the rows' min and max are in results.csv); "
        "the table below gives every plotted value.",
        ep_scale.ep_scale,
        table=True,
    ),
    FigureSpec(
        "ep-scale-split",
        "Simulated expert parallelism: step time split into communication and compute",
        "The estimated step of the layer on its critical path: communication (slowest "
        "dispatch + slowest combine) and expert compute (the rank with the most assignments, "
        "at the configured GEMM rate), one line per rule and placement, per arm; no overlap "
        "unless task.overlap. The table below gives every plotted value.",
        ep_scale.ep_scale_split,
        table=True,
    ),
)


def claim_figures(results: list) -> list[FigureSpec]:
    """One figure per covered claim: the validation loss of that claim's arms only."""
    return [
        FigureSpec(
            f"claim-{r.claim.id}-{n}",
            f"Claim {r.claim.id}: {r.claim.title}",
            f"Validation loss of {' + '.join(r.arms[0])} against {' + '.join(r.arms[1])}, "
            f"this claim's arms only ({r.setting}); " + BAND_NOTE + ".",
            claims.claim_loss(r),
        )
        for n, r in enumerate(results)
    ]
