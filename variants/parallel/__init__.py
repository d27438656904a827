"""Parallel room: a layer's experts sharded over a process group (`expert_parallel`).

Starting and joining processes is the runner's (`moe_bench.launch`). Imports the contract and
compute rooms, never a routing rule.
"""
