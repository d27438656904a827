"""Contract room: what every variant is built from and returns (docs/contract.md §2).

`config` (`MoEConfig` and the check helpers), `routing` (the `Router` base and the routing math
several rules share), `layer` (`MoELayer`, `MoEOutput`). Imports the compute room, never the
parallel room or a routing rule.
"""
