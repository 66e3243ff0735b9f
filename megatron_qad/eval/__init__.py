"""Quality reports on models: per-weight quantization error, and later KL / CE / agreement vs the teacher."""
