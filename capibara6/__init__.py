"""capibara6: an OpenAI-compatible, multi-model LLM inference server for ARM CPUs."""

__version__ = "0.1.0"
