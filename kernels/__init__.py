"""Fused linear GRPO kernels."""
