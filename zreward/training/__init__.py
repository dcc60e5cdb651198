"""Training (paper Sec. 4): the trainer base every trainer shares (optimizer, clipping, checkpoints, exact
resume, logging), GDSO for the teacher (Algorithm 1), RISD for the student (Algorithm 2), atomic safetensors
checkpoints and torch.distributed helpers."""
