"""Tasks as registered objects (moe_bench.task, moe_bench.registry), the run card on every job's
closing row (moe_bench.recorder), and config keys unchanged by the move."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import moe_bench.tasks
from moe_bench import registry, results
from moe_bench.config import CPU_TFLOP_BUDGET, TaskConfig, resolve
from moe_bench.runner import execute, run_resolved
from moe_bench.task import Asks, Task
from tests.moe_bench.conftest import FAST

# the run card (docs/contract.md §5): written on the closing `job` row of every job
ENV_COLUMNS = (
    "env.cpu", "env.gpu", "env.cores", "env.device_memory_gib", "env.threads", "env.torch",
    "env.cuda", "env.python", "env.platform", "env.commit", "env.date", "env.load_avg_before",
    "env.load_avg_after",
)  # fmt: skip
CARD_COLUMNS = (
    "card.task_order", "card.task_ask", "card.task_measure", "card.task_answers",
    "card.variant_note",
)  # fmt: skip
# config keys and untimed values written by the code before tasks became objects
BEFORE = json.loads((Path(__file__).parent / "data" / "keys_at_4eace0f.json").read_text())

TOY_MODULE = '''
"""toy: one eval forward of the layer; the load entropy of its routing."""

from dataclasses import dataclass

import torch

from moe_bench import schema
from moe_bench.config import Job, TaskConfig
from moe_bench.metrics import load_entropy
from moe_bench.recorder import Recorder
from moe_bench.task import Answer, Asks, Task
from moe_bench.tasks import build_layer, random_input


@dataclass
class ToyConfig(TaskConfig):
    name: str = "toy"
    forwards: int = 1


def run(job: Job, recorder: Recorder) -> None:
    layer = build_layer(job).eval()
    with torch.no_grad():
        for step in range(job.task.forwards):
            routing = layer(random_input(job)).routing
            recorder.log(schema.LOAD_ENTROPY, load_entropy(routing.load.cpu()), step=step)
    recorder.flush()


TASK = Task(
    name="toy",
    config=ToyConfig,
    run=run,
    metrics=(schema.LOAD_ENTROPY,),
    report=Asks(
        order=7,
        ask="How evenly does one forward spread its tokens?",
        measure="Measure: load entropy of one eval forward (1 = uniform).",
        answers=(Answer("most even", schema.LOAD_ENTROPY, "load entropy"),),
    ),
)
'''
TOY_YAML = """
defaults:
  - /schema/task/toy@_here_
  - _self_

name: toy
"""


@pytest.fixture
def toy(tmp_path: Path, monkeypatch) -> Path:
    """A task added the documented way: its module beside the package's task modules (here a
    directory on the package's path) and its YAML in a config directory on Hydra's search path;
    returns that config directory."""
    modules, sweeps = tmp_path / "modules", tmp_path / "sweeps" / "task"
    modules.mkdir()
    sweeps.mkdir(parents=True)
    (modules / "toy.py").write_text(TOY_MODULE)
    (sweeps / "toy.yaml").write_text(TOY_YAML)
    monkeypatch.setattr(moe_bench.tasks, "__path__", [*moe_bench.tasks.__path__, str(modules)])
    monkeypatch.delitem(sys.modules, "moe_bench.tasks.toy", raising=False)
    monkeypatch.setattr(registry, "TASKS", registry.discover())
    registry.register()
    return sweeps.parent


def test_a_task_added_as_one_module_and_one_yaml_runs_end_to_end(
    compose_cfg, toy: Path, tmp_path: Path
) -> None:
    assert "toy" in registry.names()
    searchpath = f"hydra.searchpath=[file://{toy}]"
    cfg = compose_cfg(*FAST, "task=toy", "task.forwards=2", "variant=gshard", searchpath)
    out = tmp_path / "out"
    assert execute(cfg, out, "toy") == "ok"
    frame = results.load(out)
    assert set(frame.status) == {"ok"} and set(frame.task) == {"toy"}
    entropy = frame[frame.metric == "load_entropy"]
    assert entropy.step.tolist() == [0, 1] and entropy.value.between(0, 1).all()
    assert (frame["task.forwards"] == 2).all()
    card = frame[frame.metric == "job"].iloc[0]
    assert card["card.task_ask"] == "How evenly does one forward spread its tokens?"
    assert card["card.task_order"] == 7
    answers = json.loads(card["card.task_answers"])
    assert answers == [
        {"question": "most even", "metric": "load_entropy", "pass": None, "unit": None,
         "words": "load entropy"},
    ]  # fmt: skip
    with pytest.raises(Exception, match="forwardz"):  # its schema is typed like any other
        compose_cfg(*FAST, "task=toy", "task.forwardz=2", searchpath)


def test_a_task_writes_only_its_own_metrics(compose_cfg, toy: Path, tmp_path: Path) -> None:
    toy_module = sys.modules["moe_bench.tasks.toy"]

    def run(job, recorder) -> None:
        recorder.log("fwd_ms", 1.0)

    registry.TASKS["toy"] = Task("toy", toy_module.ToyConfig, run, (), Asks(order=7))
    cfg = compose_cfg(*FAST, "task=toy", f"hydra.searchpath=[file://{toy}]")
    assert execute(cfg, tmp_path, "toy") == "failed"
    error = results.load(tmp_path).error.iloc[-1]
    assert error == (
        "metric='fwd_ms' is not one of the metrics of task='toy' (job); "
        "list it in its Task's metrics"
    )


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("X = 1\n", r"ghost\.py defines no TASK \(a moe_bench\.task\.Task\)"),
        (
            "from moe_bench.task import Asks, Task\n"
            "from moe_bench.tasks.balance import BalanceConfig, run\n"
            "TASK = Task('balance', BalanceConfig, run, (), Asks(order=0))\n",
            r"ghost\.py defines task 'balance'; a task's module is named as the task",
        ),
    ],
)
def test_the_registry_refuses_a_module_that_is_not_one_task(
    tmp_path: Path, monkeypatch, source: str, problem: str
) -> None:
    (tmp_path / "ghost.py").write_text(source)
    monkeypatch.setattr(moe_bench.tasks, "__path__", [*moe_bench.tasks.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "moe_bench.tasks.ghost", raising=False)
    with pytest.raises(ValueError, match=problem):
        registry.discover()


def test_a_task_config_must_default_to_the_task_name() -> None:
    class Other(TaskConfig):
        name = "other"

    with pytest.raises(ValueError, match=r"Other\.name defaults to 'other'; it must default"):
        Task("mine", Other, lambda job, recorder: None, (), Asks(order=0))


@pytest.mark.parametrize("name", ["throughput", "memory", "balance", "convergence"])
def test_every_task_states_its_report_asks_and_cost(compose_cfg, name: str) -> None:
    task = registry.lookup(name)
    assert task.report.ask.endswith("?") and task.report.measure
    job = resolve(compose_cfg(*FAST, f"task={name}"))
    assert job.task.name == name and isinstance(job.task, task.config)
    assert 0 < task.cost_tflop(job) < CPU_TFLOP_BUDGET  # tiny sizes fit a CPU
    for answer in task.report.answers:
        assert answer.metric in task.metrics


def test_task_orders_are_distinct() -> None:
    orders = [t.report.order for t in registry.TASKS.values()]
    assert len(set(orders)) == len(orders)


def test_ok_and_failed_jobs_carry_the_run_card(compose_cfg, tmp_path: Path) -> None:
    ok = compose_cfg(*FAST, "task=balance", "task.batches=1", "variant=switch")
    failed = compose_cfg(*FAST, "task=balance", "variant=switch", "model.tokens=-64")
    assert execute(ok, tmp_path / "ok", "ok") == "ok"
    assert execute(failed, tmp_path / "failed", "failed") == "failed"
    for folder, status in (("ok", "ok"), ("failed", "failed")):
        rows, problems = results.read_rows(tmp_path / folder)
        assert not problems and rows[-1]["metric"] == "job" and rows[-1]["status"] == status
        card = rows[-1]
        assert set(ENV_COLUMNS + CARD_COLUMNS) <= card.keys()
        cards = [k for r in rows[:-1] for k, v in r.items() if v is not None]
        assert not any(k.startswith(("env.", "card.")) for k in cards)
        assert card["env.cores"] >= 1 and card["env.threads"] == 1 and card["env.gpu"] is None
        assert card["env.date"].endswith(" UTC") and card["env.python"].count(".") == 2
        assert card["card.task_order"] == registry.lookup("balance").report.order
        assert card["card.task_ask"] == "How evenly does an untrained router spread tokens?"
        answers = json.loads(card["card.task_answers"])
        assert [a["question"] for a in answers] == ["most balanced untrained"]
        assert isinstance(card["card.variant_note"], str)
        # never part of the identity: the recorded key has none of them
        key = results.recorded_config(tmp_path / folder)
        assert key and not any(k.startswith(("env.", "card.")) for k in key)
    assert execute(ok, tmp_path / "ok", "again") == "skipped"


@pytest.mark.parametrize("case", sorted(BEFORE))
def test_config_keys_are_those_of_the_code_before(compose_cfg, case: str) -> None:
    """Resume of a folder written before this layout sees its jobs as the same config; the
    expert-parallel key differs by the one renamed field (task.backend -> task.dist_backend)."""
    before = BEFORE[case]
    job = resolve(compose_cfg(*before["overrides"]))
    key = results.config_key(job.columns)
    if "key" not in before:
        assert results.config_hash(key) == before["hash"]
        return
    old = dict(before["key"])
    old["task.dist_backend"] = old.pop("task.backend")
    assert key == old


@pytest.mark.parametrize("case", ["balance_deepseek_v3", "convergence_dense"])
def test_untimed_values_are_those_of_the_code_before(
    compose_cfg, tmp_path: Path, case: str
) -> None:
    before = BEFORE[case]
    assert run_resolved(resolve(compose_cfg(*before["overrides"])), tmp_path) == "ok"
    rows, _ = results.read_rows(tmp_path)
    kept = {v[0] for v in before["values"]}
    values = [
        [r["metric"], r.get("domain"), r.get("step"), r.get("expert"), r.get("loss"), r["value"]]
        for r in rows
        if r["metric"] in kept
    ]
    assert values == before["values"]


def test_a_folder_written_before_resumes_as_the_same_config(compose_cfg, tmp_path: Path) -> None:
    """job.json as the code before wrote it (its key and hash): an ok job there is skipped."""
    before = BEFORE["throughput_switch"]
    cfg = compose_cfg(*before["overrides"])
    key = results.config_key(resolve(cfg).columns)
    results.write_state(tmp_path, "ok", key)
    state = json.loads((tmp_path / results.STATE).read_text())
    assert state["config_hash"] == before["hash"]
    row = {**key, "metric": "job", "value": 1.0, "unit": "s", "step": None, "status": "ok"}
    (tmp_path / results.RESULTS).write_text(json.dumps({**row, "error": None}) + "\n")
    assert execute(cfg, tmp_path, "resume") == "skipped"


@pytest.mark.slow  # a fresh process (test_layout checks the import graph by default)
def test_results_imports_no_torch() -> None:
    code = textwrap.dedent(
        """
        import sys
        import moe_bench.results, moe_bench.task, moe_bench.identity, moe_bench.schema
        print("torch" in sys.modules)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "False"


def test_a_column_added_later_is_out_of_the_key_at_the_value_older_jobs_ran_with() -> None:
    """deepseek_v3's `score` came after results were written: sigmoid (what every older job
    ran) leaves the key as it was; another score is part of the key."""
    base = {"variant": "deepseek_v3", "task": "balance", "variant.top_k": 2}
    assert results.config_key({**base, "variant.score": "sigmoid"}) == base
    assert results.config_key({**base, "variant.score": "softmax"})["variant.score"] == "softmax"
