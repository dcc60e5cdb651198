"""Triton kernels and their launchers (one file per op family), and the CUDA extension's launchers."""
