"""Inference engines for the no-gradient paths (teacher rollouts, student score distributions)."""
