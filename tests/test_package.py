"""The top-level names users import: each resolves, is documented, and importing the package stays light."""
import subprocess
import sys

import pytest

import zreward


@pytest.mark.parametrize("name", zreward.__all__)
def test_every_exported_name_resolves_and_has_a_docstring(name):
    value = getattr(zreward, name)
    if callable(value):
        assert (value.__doc__ or "").strip(), f"zreward.{name} has no docstring"


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'GDSO'"):
        zreward.GDSO  # noqa: B018


def test_import_zreward_does_not_import_transformers_or_diffusers():
    code = "import sys, zreward, zreward.cli; print(sorted({'transformers', 'diffusers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
