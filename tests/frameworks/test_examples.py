"""examples/torch_loop.py and examples/jax_loop.py run as written: each trains, is stopped
after epoch 3, resumes from the latest committed epoch and ends bit-exact with a run that
was never interrupted (the scripts compare and print PASS)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.runner_child import run_example, run_readme_snippet


@pytest.mark.parametrize("where", ["directory", pytest.param("embedded-s3", marks=pytest.mark.slow)])
def test_the_pytorch_loop_resumes_bit_exact(tmp_path: Path, where: str) -> None:
    pytest.importorskip("torch")
    lines = run_example("torch_loop.py", tmp_path, [str(tmp_path / "ckpt")] if where == "directory" else [])
    assert "resumed from epoch 3 (lr 0.005)" in lines, lines


@pytest.mark.parametrize("where", ["directory", pytest.param("embedded-s3", marks=pytest.mark.slow)])
def test_the_jax_loop_resumes_bit_exact(tmp_path: Path, where: str) -> None:
    pytest.importorskip("jax")
    lines = run_example("jax_loop.py", tmp_path, [str(tmp_path / "ckpt")] if where == "directory" else [])
    assert "resumed from epoch 3 (step 24)" in lines, lines


def test_the_readme_pytorch_loop_runs_as_written_and_resumes(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    first = run_readme_snippet("torch-loop", "s3://my-bucket/runs/torch", tmp_path / "ckpt")
    assert first == ["epoch 4 lr 0.0025"]
    assert run_readme_snippet("torch-loop", "s3://my-bucket/runs/torch", tmp_path / "ckpt") == first  # resumed at 4


def test_the_readme_dcp_example_runs_as_written(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    run_readme_snippet("dcp", "s3://my-bucket/runs/exp1", tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "step-100" / "dcp.metadata").is_file()
    assert (tmp_path / "ckpt" / "step-200" / "dcp.metadata").is_file()
