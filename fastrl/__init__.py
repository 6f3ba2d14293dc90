"""fastrl: a fast, lean GRPO trainer."""
from fastrl.config import GRPOConfig


def __getattr__(name):
    # GRPOTrainer pulls in torch, transformers and the kernels: import it on first use, so `fastrl --help` and
    # `from fastrl import GRPOConfig` stay quick.
    if name == "GRPOTrainer":
        from fastrl.trainer import GRPOTrainer

        return GRPOTrainer
    raise AttributeError(f"module 'fastrl' has no attribute {name!r}")


__all__ = ["GRPOConfig", "GRPOTrainer"]
