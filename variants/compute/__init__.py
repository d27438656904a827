"""Compute room: how routed experts compute a routing's output.

`assignments` (the `Routing` record every router makes and every backend reads), `experts`
(`ExpertBank`, the stacked expert weights), `dispatch` (sorting and row layouts, the CPU GEMM
Functions), `backends` (`BackendSpec`, the one list of backends) and `megablocks` (imported
only by its backend). Imports torch and this room only: never the contract, parallel or a
routing rule.
"""
