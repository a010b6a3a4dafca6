"""SkipPipe routing and CheckFree recovery for DeepSpeed and Megatron-core pipelines."""

__version__ = "0.1.0"
