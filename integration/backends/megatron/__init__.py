"""megatron-core backend: a routed ``forward_backward_func``, stage models from megatron-core parts,
the rank-grid mapping, CPU patches and the main job's backend (``build_megatron_backend``)."""
