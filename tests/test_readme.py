"""The README and the pages in docs/ stay true: their Python examples run as written (on CPU they take the reference
path), the README's test command is the one CI runs, and every file they link exists.

Blocks fenced ```python run, each page's blocks in order in one namespace (later blocks use names from earlier
ones, as a reader would), in a scratch directory; fragments that need a live service or a cluster are fenced ```py
(highlighted the same, not run).
"""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def run_examples(page: Path) -> dict:
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(page), "exec"), namespace)
    return namespace


def test_readme_example_runs_its_kernels(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = run_examples(README)
    assert namespace["ran"], "trace_backends recorded nothing"


@pytest.mark.parametrize("page", [p for p in PAGES if p != README and "```python" in p.read_text()],
                         ids=lambda p: p.name)
def test_docs_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples write their outputs (model folders, runs/) under the current directory
    run_examples(page)


def test_readme_test_command_is_the_one_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    readme_commands = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    test_command = "TRITON_INTERPRET=1 python -m pytest -q tests"
    assert any(test_command in block for block in readme_commands[:2]), "one of the first two commands runs the tests"
    assert test_command in ci.splitlines()[-1], "CI's last step is the README's test command"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_point_at_files_that_exist(page):
    links = re.findall(r"\]\(((?!https?://|#)[^)]+)\)", page.read_text())
    missing = [link for link in links if not (page.parent / link.split("#")[0]).exists()]
    assert not missing, f"{page.name}: {missing}"


def test_readme_is_a_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; put the depth in docs/"
    linked = set(re.findall(r"\(docs/([^)#]+)", README.read_text()))
    assert linked >= {p.name for p in (ROOT / "docs").glob("*.md")}, "every page in docs/ is linked from the README"
