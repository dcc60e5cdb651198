"""A small workload for compute-sanitizer: every launcher of zr_kernels._C, forward and backward, in each dtype
and K bucket, with strided hidden rows, LM-head ids (one out of range), a bias, N = 1 and odd D.

Run through csrc/run_sanitizer.sh (needs a CUDA GPU and the built extension); exits 0 when the kernels ran.
"""
import torch

from zr_kernels import linear_score

CASES = [  # rows, dim, vocab, bins, lm_head
    (1, 1, 4, 1, False),
    (3, 257, 50, 9, True),
    (70, 300, 64, 16, True),
    (129, 1000, 40, 32, False),
]


def main() -> None:
    torch.manual_seed(0)
    device = torch.device("cuda")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for rows, dim, vocab, bins, lm_head in CASES:
            hidden = torch.randn(rows, 2, dim, device=device, dtype=dtype)[:, -1, :].requires_grad_()
            weight = torch.randn(vocab if lm_head else bins, dim, device=device, dtype=dtype, requires_grad=True)
            bias = torch.randn(weight.shape[0], device=device, dtype=dtype, requires_grad=True)
            ids = torch.randperm(vocab, device=device)[:bins] if lm_head else None
            out = linear_score(hidden, weight, torch.linspace(1, 5, bins).tolist(), ids, bias, 0.8, backend="cuda")
            (out.probs.sum() + out.mean.sum() + out.std.sum()).backward()
    # An out-of-range id on the device is never read: NaN statistics, no gradient rows written.
    weight = torch.randn(10, 64, device=device, requires_grad=True)
    hidden = torch.randn(5, 64, device=device, requires_grad=True)
    out = linear_score(hidden, weight, [1.0, 2.0], torch.tensor([3, 10], device=device), backend="cuda")
    out.mean.sum().backward()
    torch.cuda.synchronize()
    print("sanitize_driver: all launchers ran")


if __name__ == "__main__":
    main()
