"""The README's commands and example are the ones that work."""

import re

from conftest import REPO


def readme() -> str:
    return (REPO / "README.md").read_text()


def test_the_api_example_runs(tmp_path, monkeypatch):
    block = re.search(r"## Use it in your own code\n\n```python\n(.*?)```", readme(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["tokens"].shape == (1, 20)
    assert (tmp_path / "hycam-ckpt" / "hycam_model.safetensors").is_file()


def test_ci_runs_the_readme_test_command():
    first_block = re.search(r"```bash\n(.*?)```", readme(), re.S).group(1)
    test_command = first_block.strip().splitlines()[1].split("#")[0].strip()
    assert test_command in (REPO / ".ci" / "run").read_text()
    assert "bash scripts/install.sh" in first_block and "bash scripts/install.sh" in (REPO / ".ci" / "run").read_text()
