"""Kernel generation and launch for the fa3 attention op (no torch.fx here)."""
