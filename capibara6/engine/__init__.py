"""Native inference engine: GGUF models run on the project's own kernels (see README.md)."""
