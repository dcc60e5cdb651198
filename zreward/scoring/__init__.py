"""Scoring (paper Sec. 3): the score vocabulary and rubric, Qwen-VL image processing, the reward scorer (score
distribution at the answer position, reasoning rollouts), the shared-prefix forward and the gated-delta kernels
for Qwen3.5's linear-attention layers."""
