"""Evaluation: robust accuracy under attacks in two threat models (transfer, white-box)."""
