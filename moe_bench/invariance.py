"""The invariance suite: a batch's auxiliary loss, its gradient and the step's state update must
not depend on how the batch is split into forwards, checkpointed, sharded or rounded.

Shape legend: B sequences, S sequence length, D model width.

Trainers get this wrong in known ways: the balance loss drifting with pipeline size
(databricks/megablocks#85), loads counted twice under activation checkpointing
(pytorch/torchtitan#1593), global-batch balance against checkpointing and micro-batches
(NVIDIA/Megatron-LM#4772), router precision changing results (sgl-project/sglang#38695).

Cases: every registered variant (`variants.names()`) whose layer has a training loss or state
updated once per step (a bias, a coefficient: any buffer), at a small size, once per
`balance_scope` where its config has that field. Nothing is chosen by name: sizes are a
small common set plus the fields of the variant's sweep file (`sweeps/variant/<name>.yaml`),
what a split may change comes from the config's `loss_scope`, whether it can run expert-parallel
from `token_choice` and `ExpertParallel`'s own refusal.

Each case runs a batch of B sequences once as the reference (one forward, one process, router
in float32, no checkpointing), then under each split of `SPLITS`, and compares, per quantity:
- `routing`: the kept (token, expert) pairs, the share of the reference's that changed;
- `aux_loss`: the step's auxiliary loss, the mean over its forwards (micro-batches, ranks);
- `aux_grad`: the gradient of that loss, every router parameter, max over all entries;
- `counts`: the step counts a router keeps for its update (its integer buffers: V3's load,
  ReMoE's active and slot counts), summed over ranks;
- `update`: the router's floating buffers after the step's `update_bias()` (V3's bias,
  ReMoE's lambda).
The difference is `max |got - ref| / max |ref|` (relative to the quantity's scale). Where
the split leaves the quantity unchanged by construction the row expects `equal` and passes
when the difference is within the split's tolerance; where it does not (a loss counted per
micro-batch, `loss_scope="micro_batch"`, under a split into forwards; the running global count
of `micro4_running`) the row expects `differs`, states the difference, and passes when the
difference is beyond the tolerance (a claim that the split matters is checked as well).
Under `router_bf16` decisions near a tie may flip (sgl-project/sglang#38695): the loss is
still judged against the bf16 tolerance, while the gradient, counts and update are judged only
where no decision changed; where some did, their rows are `stated` (the difference and the
share of changed decisions reported, nothing judged). A variant whose training routing
samples in passes over the whole forward (`draws_over_the_batch`, SparseMixer) draws other
numbers for the same tokens under a split into forwards: its routing there is `stated` too. A
failure names the case, the split and the quantity.

Random routing draws (GShard's second choice, noisy gating) are made from one RNG stream: a
split draws the same numbers for the same tokens as the reference (torch's CPU generator
yields the same stream in pieces; ranks advance it over the earlier ranks' tokens first).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

import variants
from moe_bench.paths import config_dir
from variants.contract.config import BALANCE_SCOPES
from variants.contract.recompute import checkpointed
from variants.parallel.expert_parallel import check_shardable

B, S, D = 8, 8, 16  # B sequences of S tokens: 4 micro-batches or 4 ranks get 2 each
SMALL = dict(d_model=D, num_experts=8, expert_hidden=16, backend="loop")
SIZE_KEYS = ("name", "granularity", "num_experts", "expert_hidden", "top_k", "d_ff")
# float32 sums in another order: a few units in the 7th digit (the committed run,
# reports/invariance, `+experiment=invariance`: largest 3.7e-7)
FP32_RTOL = 1e-5
# bfloat16 keeps 8 significant bits (unit roundoff 2^-8 = 3.9e-3); one rounding of the input
# and of the router weight moves each logit by about 2 units, the softmax and the loss then
# by a few more: 8 units is the stated tolerance (the committed run: largest 1.0e-2)
BF16_RTOL = 8 * 2.0**-8
QUANTITIES = ("routing", "aux_loss", "aux_grad", "counts", "update")


@dataclass(frozen=True)
class Split:
    """One way to run the reference batch: `forwards` micro-batches in one process or `ranks`
    processes, `checkpoint`ed or not, the router in `router_dtype`; `running` keeps the
    global-batch counts a running total instead of fixing them from a count pass first."""

    name: str
    words: str
    forwards: int = 1
    ranks: int = 1
    parallel: str = ""  # "", "expert" or "data"
    checkpoint: bool = False
    router_dtype: str = "float32"
    running: bool = False

    @property
    def rtol(self) -> float:
        return BF16_RTOL if self.router_dtype == "bfloat16" else FP32_RTOL

    @property
    def splits_tokens(self) -> bool:
        """Whether one forward sees fewer than all of the batch's tokens."""
        return self.forwards * self.ranks > 1


SPLITS = (
    Split("micro4", "4 micro-batches, gradients accumulated", forwards=4),
    Split("micro4_running", "4 micro-batches, global counts running", forwards=4, running=True),
    Split("checkpoint", "one forward, activation checkpointing", checkpoint=True),
    Split("micro4_checkpoint", "4 checkpointed micro-batches", forwards=4, checkpoint=True),
    Split("router_bf16", "one forward, router in bfloat16", router_dtype="bfloat16"),
    Split("ep2", "expert-parallel, 2 gloo ranks", ranks=2, parallel="expert"),
    Split("ep4", "expert-parallel, 4 gloo ranks", ranks=4, parallel="expert"),
    Split("dp2", "data-parallel, 2 gloo ranks", ranks=2, parallel="data"),
)
LOCAL = tuple(s for s in SPLITS if s.ranks == 1)
DISTRIBUTED = tuple(s for s in SPLITS if s.ranks > 1)


@dataclass(frozen=True)
class Case:
    """A variant at the suite's size; `label` names its config where the variant has several."""

    variant: str
    fields: tuple[tuple[str, Any], ...]
    label: str

    def build(self, **overrides: Any) -> nn.Module:
        torch.manual_seed(0)
        return variants.build(self.variant, **{**dict(self.fields), **overrides}).train()

    @property
    def config(self) -> Any:
        return variants.make_config(self.variant, **dict(self.fields))


def sweep_fields(name: str) -> dict[str, Any]:
    """The non-size fields the variant's sweep file sets (e.g. DeepSeek-V3's groups)."""
    path = config_dir() / "variant" / f"{name}.yaml"
    if not path.exists():
        return {}
    node = OmegaConf.to_container(OmegaConf.load(path))
    return {k: v for k, v in node.items() if k != "defaults" and k not in SIZE_KEYS}


def small_fields(name: str) -> dict[str, Any]:
    cfg_cls = variants.lookup(name).config
    top_k = cfg_cls.fixed_top_k[0] if cfg_cls.fixed_top_k else 2
    # dropless: capacity is per forward by design (Switch Sec. 2.2), so a split changes which
    # assignments are dropped; the suite compares the routing decisions themselves
    fields = {**SMALL, "top_k": top_k, **sweep_fields(name), "capacity_factor": None}
    fields = {k: v for k, v in fields.items() if k in {f.name for f in dataclasses.fields(cfg_cls)}}
    try:
        variants.make_config(name, **fields)
    except ValueError:  # a variant that needs a capacity (expert choice) keeps its own
        del fields["capacity_factor"]
    return fields


def steps_state(layer: nn.Module) -> bool:
    """Whether a training forward gives losses or the layer keeps per-step state (buffers)."""
    x = torch.randn(2, S, D, generator=torch.Generator().manual_seed(0))
    return bool(layer(x).losses) or any(True for _ in layer.buffers())


@functools.cache
def cases() -> tuple[Case, ...]:
    """Every registered variant with a loss or step state, once per balance scope it takes."""
    found = []
    for name in variants.names():
        base = small_fields(name)
        if variants.lookup(name).config.uses_token_ids:
            continue  # hash routing: no loss, and its one buffer (the id table) never changes
        try:
            layer = Case(name, tuple(sorted(base.items())), name).build()
        except ValueError:
            continue  # does not build at the small size (a peer's constraint): not covered
        if not steps_state(layer):
            continue
        fields = {f.name for f in dataclasses.fields(layer.cfg)}
        scopes = BALANCE_SCOPES if "balance_scope" in fields else (None,)
        for scope in scopes:
            f = dict(base, balance_scope=scope) if scope else base
            label = f"{name} · {scope}" if scope else name
            found.append(Case(name, tuple(sorted(f.items())), label))
    return tuple(found)


def batch() -> torch.Tensor:
    return torch.randn(B, S, D, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------
# Measuring one arm
# ---------------------------------------------------------------------------------------------


@dataclass
class Measured:
    values: dict[str, torch.Tensor] = field(default_factory=dict)


def step_counts(layer: nn.Module, xs: list[torch.Tensor]) -> torch.Tensor | None:
    """The step's global-batch balance counts, from a no-grad pass over every forward on a copy
    (the layer's own counts and the RNG stream untouched); None where the layer keeps none."""
    if layer.cfg.loss_scope != "global_batch":
        return None
    probe = copy.deepcopy(layer)
    with torch.no_grad(), torch.random.fork_rng():
        for x in xs:
            probe(x)
    return probe.router.balance_counts


def count_buffers(router: nn.Module) -> torch.Tensor:
    ints = [b.flatten().double() for b in router.buffers() if not b.is_floating_point()]
    return torch.cat(ints) if ints else torch.zeros(0)


def float_buffers(router: nn.Module) -> torch.Tensor:
    floats = [b.flatten().double() for b in router.buffers() if b.is_floating_point()]
    return torch.cat(floats) if floats else torch.zeros(0)


def router_grad(router: nn.Module) -> torch.Tensor:
    grads = [
        (p.grad if p.grad is not None else torch.zeros_like(p)).flatten().double()
        for p in router.parameters()
    ]
    return torch.cat(grads)


def run_forwards(
    layer: nn.Module, xs: list[torch.Tensor], checkpoint: bool, scale: float, first: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of each piece (aux loss times `scale`): the summed loss and the kept
    assignments as sorted codes `token * E + expert` (tokens numbered from `first`)."""
    total = torch.zeros((), dtype=torch.float64)
    lossless = True
    codes = []
    for x in xs:
        out = checkpointed(layer, x) if checkpoint else layer(x)
        if out.aux_loss.requires_grad:  # a layer with step state but no loss (LongCat-Flash)
            lossless = False
            (out.aux_loss * scale).backward()
        total += float(out.aux_loss.detach()) * scale
        r = out.routing
        codes.append((r.token + first) * r.num_experts + r.expert)
        first += r.num_tokens
    # no loss: nothing to compare (an empty quantity is left out of the rows)
    return (torch.zeros(0) if lossless else total), torch.cat(codes).sort().values


def measure_local(case: Case, split: Split | None) -> Measured:
    """The reference (split None) or a one-process split, from the same layer and batch."""
    split = split or Split("reference", "one forward")
    layer = case.build(router_dtype=split.router_dtype)
    xs = list(batch().chunk(split.forwards))
    if not split.running:
        counts = step_counts(layer, xs)
        if counts is not None:
            layer.set_balance_counts(counts)
    torch.manual_seed(2)
    aux, codes = run_forwards(layer, xs, split.checkpoint, 1.0 / split.forwards)
    return finish(layer, layer.router, aux, codes)


def finish(layer: nn.Module, router: nn.Module, aux: torch.Tensor, codes: torch.Tensor) -> Measured:
    m = Measured({"routing": codes, "aux_loss": aux.view(-1)})
    if aux.numel():  # no loss, no gradient to compare
        m.values["aux_grad"] = router_grad(router)
    m.values["counts"] = count_buffers(router)
    layer.update_bias()
    m.values["update"] = float_buffers(router)
    m.values = {k: v for k, v in m.values.items() if v.numel()}
    return m


# ---------------------------------------------------------------------------------------------
# Comparing
# ---------------------------------------------------------------------------------------------


def expects_equal(case: Case, split: Split, quantity: str) -> bool:
    """Whether `split` leaves `quantity` unchanged by construction (module doc)."""
    if quantity in ("routing", "counts", "update"):
        return True  # decided and counted per token, summed over forwards and ranks
    if not split.splits_tokens:
        return True
    return case.config.loss_scope != "micro_batch" and not split.running


def changed_share(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Share of the reference's assignments (sorted codes) missing from `got`."""
    kept = torch.isin(ref, got).sum() if ref.numel() else 0
    return 1.0 - float(kept) / max(ref.numel(), 1) + float(got.numel() != ref.numel())


def relative_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    if got.shape != ref.shape:
        return float("inf")
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    diff = float((got - ref).abs().max()) if ref.numel() else 0.0
    return diff / scale if scale > 0 else diff


def compare(case: Case, split: Split, ref: Measured, got: Measured) -> list[dict[str, Any]]:
    """One row per quantity: case, split, quantity, max difference, tolerance, expectation."""
    rows = []
    flipped = changed_share(got.values["routing"], ref.values["routing"])
    # the step counts count decisions too (LongCat-Flash's pool, whose identity experts the
    # routing record leaves out): counts that differ mean some decision changed
    counts_ref = ref.values.get("counts", torch.zeros(0))
    counts_got = got.values.get("counts", torch.zeros(0))
    decided_otherwise = flipped > 0 or not torch.equal(counts_ref, counts_got)
    for quantity in QUANTITIES:
        if quantity not in ref.values:
            continue
        if quantity == "routing":
            diff = flipped
        else:
            diff = relative_diff(got.values.get(quantity, torch.zeros(0)), ref.values[quantity])
        equal = expects_equal(case, split, quantity)
        sampled = split.splits_tokens and case.config.draws_over_the_batch
        stated = (split.router_dtype != "float32" or sampled) and (
            quantity == "routing" or (quantity != "aux_loss" and decided_otherwise)
        )
        rows.append(
            {
                "variant": case.variant,
                "case": case.label,
                "split": split.name,
                "quantity": quantity,
                "max_diff": diff,
                "tolerance": split.rtol,
                "expect": "stated" if stated else "equal" if equal else "differs",
                "passed": True if stated else diff <= split.rtol if equal else diff > split.rtol,
            }
        )
    return rows


def runs_on(case: Case, split: Split) -> str | None:
    """Why `split` does not apply to `case`, or None where it does."""
    cfg = case.config
    if split.running and cfg.loss_scope != "global_batch":
        return "running counts exist for balance_scope=global_batch only"
    if split.parallel == "expert":
        if cfg.num_experts % split.ranks:
            return f"num_experts={cfg.num_experts} not divisible by {split.ranks} ranks"
        try:  # the wrapper's own checks: token-choice, no forward of its own, ...
            check_shardable(case.build())
        except ValueError as why:
            return str(why)
    return None


def failures(rows: list[dict[str, Any]]) -> list[str]:
    """One line per failed row: the case, the split, the quantity and the numbers."""
    return [
        f"{r['case']} under {r['split']}: {r['quantity']} differs by {r['max_diff']:.3g} "
        f"(expected {r['expect']}, tolerance {r['tolerance']:.3g})"
        for r in rows
        if not r["passed"]
    ]


def local_rows(chosen: list[Case] | tuple[Case, ...] | None = None) -> list[dict[str, Any]]:
    """Every one-process split of every case (or of `chosen`)."""
    rows = []
    for case in chosen or cases():
        ref = measure_local(case, None)
        for split in LOCAL:
            if runs_on(case, split) is None:
                rows.extend(compare(case, split, ref, measure_local(case, split)))
    return rows


# ---------------------------------------------------------------------------------------------
# Expert- and data-parallel splits (gloo ranks; the slow run)
# ---------------------------------------------------------------------------------------------


def advance_rng(layer: nn.Module, earlier: list[torch.Tensor]) -> None:
    """Draw the random numbers the earlier ranks' tokens use (one process's stream), on a copy
    that counts per forward, so no collective runs and no state changes."""
    probe = copy.deepcopy(layer)
    for module in (probe, probe.router):
        module.cfg = copy.copy(module.cfg)
        if hasattr(module.cfg, "balance_scope"):
            module.cfg.balance_scope = "micro_batch"
    with torch.no_grad():
        for x in earlier:
            probe(x)


def measure_rank(rank: int, world: int, case: Case, split: Split) -> dict[str, torch.Tensor]:
    """This rank's part of a distributed split: its block of sequences, one forward; the loss,
    gradients and counts reduced over ranks, the assignments of its own tokens."""
    import torch.distributed as dist

    from variants.contract.routing import sync_step_counts
    from variants.parallel.expert_parallel import ExpertParallel

    layer = case.build()
    # before the seed: slicing the experts initialises a bank (draws random numbers)
    module = ExpertParallel(layer) if split.parallel == "expert" else layer
    xs = list(batch().chunk(world))
    torch.manual_seed(2)
    advance_rng(layer, xs[:rank])
    aux, codes = run_forwards(module, [xs[rank]], False, 1.0, first=rank * xs[0][..., 0].numel())
    if aux.numel():
        dist.all_reduce(aux)
    router = layer.router
    for p in router.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world
    counts = count_buffers(router)
    dist.all_reduce(counts)
    if split.parallel == "expert":
        module.update_bias()  # expert parallelism's own update: counts summed over ranks
    else:
        sync_step_counts(router)
        layer.update_bias()
    values = {"routing": codes, "aux_loss": (aux / world).view(-1)}
    if aux.numel():  # no loss, no gradient to compare
        values["aux_grad"] = router_grad(router)
    values.update(counts=counts, update=float_buffers(router))
    return {k: v for k, v in values.items() if v.numel() or k == "routing"}


def rank_jobs(rank: int, world: int, jobs: list[tuple[Case, Split]]) -> list[dict]:
    """Run by each spawned rank (`moe_bench.tasks.invariance.distributed_rows`)."""
    torch.set_num_threads(1)
    return [measure_rank(rank, world, case, split) for case, split in jobs]
