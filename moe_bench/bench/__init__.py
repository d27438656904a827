"""The layer benchmark: its cases (`cases`), HF transformers' MoE block as a peer (`hf_peer`) and
the CI gate on a benchmark run (`benchgate`). `tests/benchmarks` times the cases; the speed
scripts in `scripts/` build their layers from here too."""
