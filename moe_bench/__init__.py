"""moe_bench: the runner around `variants`: a Hydra app over `sweeps/`, tasks, results, report.

    python -m moe_bench task=throughput variant=gshard
    python -m moe_bench -m variant=switch,gshard,deepseek_moe,deepseek_v3 task=throughput,memory
    python -m moe_bench +experiment=quick

See SPEC sections 4-6 and docs/architecture.md.
"""
