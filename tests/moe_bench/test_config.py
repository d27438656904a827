"""Every group, variant and preset composes (Hydra compose API) and validates before any work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError

import variants
from moe_bench import components, registry, results
from moe_bench.config import resolve
from tests.moe_bench.conftest import SWEEPS
from tests.slow_cases import some_slow

PRESETS = sorted(p.stem for p in (SWEEPS / "experiment").glob("*.yaml"))
YAML_TASKS = sorted(p.stem for p in (SWEEPS / "task").glob("*.yaml"))


ROUTED_SIZES = ("num_experts", "expert_hidden", "top_k")
VARIANT_FILES = sorted(p.stem for p in (SWEEPS / "variant").glob("*.yaml"))


def pinned_sizes(preset: str) -> dict[str, int] | None:
    """A released model's preset sizes itself (its E, K and H kept in the model's ratios):
    the sizes it sets, or None where they are derived at equal active FLOPs."""
    node = OmegaConf.load(SWEEPS / "variant" / f"{preset}.yaml")
    sizes = {k: node[k] for k in ROUTED_SIZES if node.get(k) is not None}
    return sizes if len(sizes) == len(ROUTED_SIZES) else None


def test_every_registered_variant_has_a_config_file_and_back() -> None:
    """Each registered component has its file; the other files are presets of one of them
    (a released model's settings of a variant, e.g. glm4_moe of deepseek_v3), sized at equal
    active FLOPs or pinned to the model's own sizes."""
    assert set(components.names()) <= set(VARIANT_FILES)
    for preset in sorted(set(VARIANT_FILES) - set(components.names())):
        name = OmegaConf.load(SWEEPS / "variant" / f"{preset}.yaml").name
        assert name in components.names(), preset
    assert sorted(registry.names()) == YAML_TASKS


MODELS = ("tiny", "small", "medium", "large")
# the default run resolves one variant file per model size (a dense FFN, top-1, fine-grained
# with shared experts, sigmoid with bias balancing) and the one preset that pins its own sizes;
# the slow run resolves the rest of the cross-product (every file at every size)
IN_DEFAULT = {
    ("dense", "tiny"), ("switch", "small"), ("deepseek_moe", "medium"), ("deepseek_v3", "large"),
    ("longcat_flash", "tiny"),
}  # fmt: skip
SIZED = [(v, m) for v in VARIANT_FILES for m in MODELS]


@pytest.mark.parametrize(("variant", "model"), some_slow(SIZED, set(SIZED) - IN_DEFAULT))
def test_variant_resolves_at_equal_active_flops(compose_cfg, variant: str, model: str) -> None:
    run = resolve(compose_cfg(f"variant={variant}", f"model={model}", "device=cpu"))
    cfg, m = run.layer, run.model
    assert cfg.d_model == m.d_model
    pinned = pinned_sizes(variant)
    if pinned is not None:  # a released model's preset: its own sizes, not iso-compute
        assert {k: getattr(cfg, k) for k in pinned} == pinned
        return
    assert run.variant == OmegaConf.load(SWEEPS / "variant" / f"{variant}.yaml").name
    active = getattr(cfg, "d_ff", None) if variant == "dense" else None
    if active is None:
        active = (cfg.top_k + cfg.num_shared_experts) * cfg.expert_hidden
    assert active == m.active * m.d_ff


def test_variant_fields_are_overridable(compose_cfg) -> None:
    run = resolve(compose_cfg("variant=deepseek_moe", "variant.top_k=2", "variant.alpha1=0.1"))
    assert run.layer.top_k == 2 and run.layer.alpha1 == 0.1
    assert run.layer.expert_hidden == run.model.d_ff // 4  # the rest still derived
    dropless = resolve(compose_cfg("variant=switch", "variant.capacity_factor=null"))
    assert dropless.layer.capacity_factor is None and dropless.layer.expert_hidden > 0


@pytest.mark.parametrize(("scope", "leaks"), [("batch", True), ("position", False)])
def test_rows_record_whether_the_layer_leaks_future_tokens(
    compose_cfg, scope: str, leaks: bool
) -> None:
    """The report's non-causal flag reads this column; the layer config says it, not its name."""
    run = resolve(compose_cfg("variant=expert_choice", f"variant.selection_scope={scope}"))
    assert run.columns["leaks_future_tokens"] is leaks
    assert resolve(compose_cfg("variant=switch")).columns["leaks_future_tokens"] is False


# the four tasks test_task_objects.py composes, resolves and checks the same way (their report
# asks) are composed here in the slow run only
REPORTED = ["balance", "convergence", "memory", "throughput"]


@pytest.mark.parametrize("task", some_slow(YAML_TASKS, REPORTED))
def test_every_task_composes(compose_cfg, task: str) -> None:
    run = resolve(compose_cfg(f"task={task}", "model=tiny"))
    assert run.task.name == task and isinstance(run.task, registry.lookup(task).config)


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_devices(compose_cfg, device: str) -> None:
    assert resolve(compose_cfg(f"device={device}")).device.type in ("cpu", "cuda")


# The default run composes one preset per kind of sweep here (a task's sweep over variants,
# expert parallelism, released models, a race); presets that other default-run tests compose
# with their sweeper params (test_claims, test_ladder_report, the quick preset's test below) and
# the other presets get these generic checks in the slow run.
IN_DEFAULT_RUN = ("convergence", "expert_parallel", "production", "quick_race")


@pytest.mark.parametrize("preset", some_slow(PRESETS, set(PRESETS) - set(IN_DEFAULT_RUN)))
def test_every_preset_composes_into_a_multirun(compose_cfg, preset: str) -> None:
    cfg = compose_cfg(f"+experiment={preset}", hydra=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    params = cfg.hydra.sweeper.params
    for option in params.get("variant", cfg.variant.name).split(","):
        # an option of the variant group (`ep/deepseek_v2_m1`) names its variant inside
        path = SWEEPS / "variant" / f"{option}.yaml"
        name = OmegaConf.load(path).name if path.is_file() else option
        assert name in variants.names()
    for task in params.get("task", cfg.task.name).split(","):
        assert task in YAML_TASKS
    resolve(cfg)  # the preset's own sizes are valid for its default variant


def test_quick_preset_is_the_headline_comparison_at_cpu_sizes(compose_cfg) -> None:
    cfg = compose_cfg("+experiment=quick", hydra=True)
    assert cfg.hydra.sweeper.params.variant == "dense,switch,gshard,deepseek_moe,deepseek_v3"
    assert cfg.hydra.sweeper.params.task == "throughput,memory,balance,convergence"
    assert cfg.model.d_model == 128


BAD_VALUES = [
    ("model.tokens=-5", r"model: tokens=-5 must be >= 1"),
    ("model.tokens=100", r"model: tokens=100 must be divisible by seq_len=256"),
    ("model.active=32", r"model: active=32 must be <= expansion=16"),
    ("dtype=float8", r"dtype='float8' is not one of"),
    ("seed=-1", r"seed=-1 must be >= 0"),
    ("device.threads=0", r"device: threads=0 must be >= 1"),
    ("device.name=tpu", r"device: name='tpu' is not one of 'auto', 'cpu', 'cuda'"),
    ("task.repeats=0", r"task: repeats=0 must be >= 1"),
    ("task.passes=[fwd,bwd]", r"task: passes=\['fwd', 'bwd'\] must be a non-empty list"),
    ("variant.capacity_factor=-1", r"variant 'switch': capacity_factor=-1.0 must be > 0"),
    ("variant.top_k=2", r"variant 'switch': top_k=2 must be 1 for switch"),
    ("variant.top_k=99", r"variant 'switch': top_k=99 must be 1 for switch"),
    ("backend=fast", r"variant 'switch': backend='fast' is not one of"),
    ("+model.tokenz=5", r"model.tokenz is not a key of model; allowed: d_model"),
]


# one bad value per config group in the default run (each a compose); the group's other rules
# in the slow run (switch's top_k rule is also in the one-line test below)
BAD_IN_THE_SLOW_RUN = {
    "model.tokens=100", "model.active=32", "device.name=tpu", "task.passes=[fwd,bwd]",
    "variant.top_k=2", "variant.top_k=99",
}  # fmt: skip


@pytest.mark.parametrize(
    ("override", "match"),
    some_slow(BAD_VALUES, [c for c in BAD_VALUES if c[0] in BAD_IN_THE_SLOW_RUN]),
)
def test_bad_values_fail_before_any_work_naming_the_key(compose_cfg, override, match) -> None:
    with pytest.raises(ValueError, match=match):
        resolve(compose_cfg(override))


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        (["variant=foo"], MissingConfigException, "Could not find 'variant/foo'"),
        (["task=bar"], MissingConfigException, "Could not find 'task/bar'"),
        (["model.tokenz=5"], ConfigCompositionException, "model.tokenz"),
        (["variant.topk=2"], ConfigCompositionException, "variant.topk"),
        (["model.tokens=abc"], ConfigCompositionException, "model.tokens"),
    ],
)
def test_unknown_names_and_keys_fail_at_composition(compose_cfg, overrides, error, match) -> None:
    with pytest.raises(error, match=match):
        compose_cfg(*overrides)


def test_schema_options_are_not_offered_as_variants(compose_cfg) -> None:
    with pytest.raises(MissingConfigException) as info:
        compose_cfg("variant=foo")
    assert "switch" in str(info.value) and "schema" not in str(info.value).split("Config search")[0]


def test_convergence_schema_is_ready(tmp_path: Path) -> None:
    from moe_bench.tasks.convergence import ConvergenceConfig

    assert ConvergenceConfig().name == "convergence"
    with pytest.raises(ValueError, match="lr=0 must be > 0"):
        ConvergenceConfig(lr=0)
    with pytest.raises((ValueError, ConfigKeyError)):
        ConvergenceConfig(steps=0)


@pytest.mark.slow  # a subprocess run or several processes: the slow run
def test_configs_compose_and_run_from_python_without_the_cli(tmp_path: Path) -> None:
    """A script or notebook: `import moe_bench` is enough, no __main__, no register() call."""
    code = (
        "import moe_bench, json, pathlib\n"
        "cfg = moe_bench.compose('variant=switch', 'task=throughput', 'model=tiny',\n"
        "                        'device=cpu', 'task.warmup=0', 'task.repeats=1')\n"
        "job = moe_bench.config.resolve(cfg)\n"
        f"print(job.variant, job.component.kind, moe_bench.run_job(job, {str(tmp_path)!r}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].split() == ["switch", "routed", "ok"]
    rows, problems = results.read_rows(tmp_path)
    assert not problems and any(row["metric"] == "tokens_per_s" for row in rows)


def test_component_registry_says_what_each_is() -> None:
    assert components.lookup("dense").is_dense and components.lookup("dense").trains
    assert components.lookup("switch").kind == "routed"
    peer = components.lookup("megablocks_dmoe")
    assert peer.origin == "peer" and not peer.trains and peer.kind == "routed"
    assert set(variants.names()) < set(components.names())
    with pytest.raises(ValueError, match=r"variant='nope' is not one of 'deepseek_moe'"):
        components.lookup("nope")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["+unknown=1"], r"^unknown=1 is not a key of the config; allowed: allow_cpu, backend"),
        (["+foo.bar=1"], r"^foo.bar=1 is not a key of the config"),
        (["variant.top_k=0"], r"top_k=0 must be a whole number >= 1 and <= num_experts$"),
        (["variant.top_k=9"], r"top_k=9 must be 1 for switch \(top-1 routing\)$"),
        (["variant=mixtral", "variant.top_k=9"], r"set num_experts, expert_hidden and top_k to"),
        (["variant=deepseek_moe", "variant.granularity=nan"], r"granularity=nan must be a finite"),
    ],
)
def test_bad_values_get_one_line_naming_field_value_and_rule(compose_cfg, overrides, match):
    with pytest.raises(ValueError, match=match) as info:
        resolve(compose_cfg(*overrides))
    assert "\n" not in str(info.value)
