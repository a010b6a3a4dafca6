"""DeepSpeed backend: the routed PipelineEngine subclass, its schedule, module builders and the main-job backend."""
