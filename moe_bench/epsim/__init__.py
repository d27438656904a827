"""Expert-parallel simulator: a layer's routing replayed over P ranks in N nodes, no process
groups (docs/expert_parallel.md, "Simulated scale").

- `rules`: the routing rules applied at P (unrestricted top-K, DeepSeek-V2 device-limited,
  DeepSeek-V3 node-limited) to a router's selection scores;
- `placement`: where each expert's copies live (contiguous, round-robin, EPLB-style redundant
  experts) and which copy serves an assignment;
- `traffic`: exact counts of one step (rows and assignments per rank pair, bytes per rank and
  direction, intra- and inter-node) and the time estimate of a machine model.

The counts are those of `variants.parallel.expert_parallel` (tests/moe_bench/test_epsim.py
holds them equal at 2 and 4 gloo ranks).
"""
