"""Recovery of lost pipeline stages without checkpoints (CheckFree / CheckFree+) on real failures.

Modules, one job each: ``rebuild`` (math, optimizer surgery, ladder), ``inject`` (SIGKILL/SIGSTOP
failure injection), ``detect`` (heartbeats, generation, failure-aware waits), ``commit`` (step
commit vote), ``rendezvous`` (agree on the generation to regroup on; coalesces close failures),
``transfer`` (stage state to a joiner), ``context`` (rank/generation/regroup), ``engine``
(failure-aware DeepSpeed routed engine and the main job's backend around it), ``checkpoint``
(DeepSpeed-format checkpoint fallback with real rollback), ``session`` (recover + rebuild the
engine), ``events`` (recovery events), ``mainjob`` (the fault-tolerant branch of
``integration/train.py``), ``worker`` (a small fault-tolerant job for tests and benchmarks).
"""
