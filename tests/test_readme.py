"""The README stays true: its Python examples run as written (on CPU they take the reference path), its test
command is the one CI runs, and the files it links exist."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_readme_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the training example writes its log and checkpoints under ./runs
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python examples"
    namespace: dict = {}
    for block in blocks:  # later blocks use names from earlier ones, as a reader would
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["ran"], "trace_backends recorded nothing"
    assert namespace["gdso"].step_count == 2 and (tmp_path / "runs" / "gdso" / "step-00000002").is_dir()
    assert namespace["risd"].step_count == 2


def test_readme_test_command_is_the_one_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    readme_commands = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    test_command = "TRITON_INTERPRET=1 python -m pytest -q tests"
    assert any(test_command in block for block in readme_commands[:2]), "one of the first two commands runs the tests"
    assert test_command in ci.splitlines()[-1], "CI's last step is the README's test command"


def test_readme_links_point_at_files_that_exist():
    links = re.findall(r"\]\(((?!https?://|#)[^)]+)\)", README.read_text())
    assert links
    missing = [link for link in links if not (ROOT / link.split("#")[0]).exists()]
    assert not missing, missing
