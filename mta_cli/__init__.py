"""mta: offline LLM distillation with Multi-Granular Trajectory Alignment."""

__version__ = "0.1.0"
