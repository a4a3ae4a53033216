"""bench.py: its options (speed itself is measured there, never in a test)."""

import subprocess
import sys

import pytest

from conftest import ROOT, python_env


@pytest.mark.parametrize(
    "args,message",
    [
        (["finetune", "--modes", "lora-int8"], "--modes: unknown 'lora-int8' (known: full, lora, lora+int8)"),
        (["finetune", "--shapes", "phi-3"], "--shapes: unknown 'phi-3'"),
        (["models", "--sizes", "tiny,1.4B"], "--sizes: unknown '1.4B'"),
        (["models", "--impls", "ours,hf"], "--impls: unknown 'hf'"),
    ],
)
def test_an_unknown_choice_is_one_clear_error_before_anything_runs(args, message):
    """A typo (lora-int8 for lora+int8 ran plain LoRA under that name) is argparse's error, exit code 2."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench.py"), *args], capture_output=True, text=True, env=python_env(), timeout=120
    )
    assert r.returncode == 2 and message in r.stderr.strip().splitlines()[-1], r.stderr
