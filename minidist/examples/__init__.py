"""Example scripts that run on real clusters under torchrun (and on a laptop without it)."""
