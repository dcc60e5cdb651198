"""Launch-size arithmetic for the launchers, in plain Python.

``triton.cdiv`` / ``triton.next_power_of_2`` are constexpr functions in recent Triton releases, whose call
unwraps constexpr arguments: a few microseconds per call on the host, paid several times per op launch.
"""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
