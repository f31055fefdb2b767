"""The README's runnable examples run as written (extracted from README.md by their marker)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).parents[2] / "README.md"


def example(name: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- readme-example: {name} -->\n```python\n(.*?)```", text, re.S)
    assert match, f"README has no example marked {name!r}"
    return match.group(1)


def test_the_multiprocess_example_commits_then_resumes_with_nothing_left(tmp_path: Path) -> None:
    script = tmp_path / "mp.py"
    script.write_text(example("multiprocess"))
    command = [sys.executable, str(script), str(tmp_path / "ckpt")]
    first = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert sorted(first.stdout.splitlines()) == [
        "rank 0: ['trainer_0', 'trainer_2'] at step [3, 3]",
        "rank 1: ['trainer_1', 'trainer_3'] at step [3, 3]",
    ]
    again = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert sorted(again.stdout.splitlines()) == sorted(first.stdout.splitlines())  # resumed at epoch 2
    assert sorted(p.name for p in (tmp_path / "ckpt" / "epochs").iterdir()) == [f"{e:012d}" for e in range(3)]
