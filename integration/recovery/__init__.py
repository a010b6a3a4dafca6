"""Recovery of lost pipeline stages without checkpoints (CheckFree / CheckFree+) on real failures.

Modules, one job each: ``rebuild`` (math, optimizer surgery, ladder), ``inject`` (SIGKILL/SIGSTOP
failure injection), ``detect`` (heartbeats, generation, failure-aware waits), ``commit`` (step
commit vote), ``transfer`` (stage state to a joiner), ``context`` (rank/generation/regroup),
``engine`` (failure-aware DeepSpeed routed engine), ``session`` (recover + rebuild the engine),
``events`` (recovery events), ``worker`` (a fault-tolerant training job for ``launch.agent``).
"""
