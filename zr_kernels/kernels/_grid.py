"""Launch-size arithmetic for the launchers, in plain Python.

``triton.cdiv`` / ``triton.next_power_of_2`` are constexpr functions in recent Triton releases, whose call
unwraps constexpr arguments: a few microseconds per call on the host, paid several times per op launch.
"""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def row_tile(width: int, max_width: int | None = None, elements: int = 4096, max_rows: int = 64) -> tuple[int, int]:
    """``(BLOCK_ROWS, BLOCK_COLS)`` of a row-block tile of about ``elements`` values: the row width rounded up to
    a power of two (capped at ``max_width``: wider rows are looped over), as many rows as fit, at most
    ``max_rows``."""
    cols = next_power_of_2(width)
    if max_width is not None:
        cols = min(cols, max_width)
    return max(1, min(max_rows, elements // cols)), cols
