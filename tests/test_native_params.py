"""The native protocol: check_params() (every value invariant, at the C++ level), the argument
table of _core.attention (and _core.pyi following it), the enums _core exports, the CPU
instruction-set table (each supported path, MHA_EXT_SIMD errors) and the binding's shape
hints."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import mha_ext
from mha_ext import _attention, _core

# ------------------------------------------------------------------------------------------
# check_params() on a valid small AttentionParams (B 2, Hq 4, Hk 2, Lq 3, Lk 5, D 8) with one
# field overridden: each bad value is refused with one wording, whoever filled the struct.

BAD = [
    ({"batch": -1}, r"^attention: sizes must be non-negative"),
    ({"seqlen_k": -3}, r"^attention: sizes must be non-negative"),
    ({"head_dim_v": -1}, r"^attention: sizes must be non-negative"),
    ({"head_dim": 0, "head_dim_k": 0}, r"^q: the head dimension D must be at least 1, got 0"),
    ({"score": 1, "head_dim_k": 0, "score_weights": True}, r"^k: the head dimension Dk"),
    ({"head_dim_k": 6}, r"^k: head dimension \(6\) must equal q's \(8\)"),
    ({"num_heads_k": 0}, r"^k: number of key/value heads must be at least 1"),
    ({"num_heads_k": 3}, r"^q, k: the number of query heads \(4\) must be a multiple .* \(3\)"),
    ({"causal": 3}, r"^causal: "),
    ({"causal": -1}, r"^causal: "),
    ({"device": 2}, r"^device: "),
    ({"dtype": 7}, r"^dtype: "),
    ({"window_left": -2}, r"^window: .*got \(-2, -1\)"),
    ({"window_right": -5}, r"^window: .*got \(-1, -5\)"),
    ({"scale": float("nan")}, r"^scale: must be finite"),
    ({"scale": float("inf")}, r"^scale: must be finite"),
    ({"scale": 1e20}, r"^scale: .*overflows the float32 logits of float32"),
    ({"scale": -1e20, "dtype": 2}, r"^scale: .*float16"),
    ({"num_threads": -1}, r"^num_threads: expected None \(the OpenMP default\) or a thread"),
    ({"num_threads": 4097}, r"^num_threads: .*from 1 to 4096, got 4097"),
    ({"key_lengths": [5, 6]}, r"^key_lengths: entry 1 is 6, expected 0 <= key_lengths\[b\] <= Lk"),
    ({"key_lengths": [-1, 2]}, r"^key_lengths: entry 0 is -1"),
    ({"score": 1}, r"^score: General needs its matrix W"),
    ({"score": 2, "score_dim": 0, "score_weights": True}, r"^w: expected a vector .*A >= 1"),
    ({"score": 2, "score_dim": 4}, r"^score: the additive score needs W_q, W_k and w"),
    ({"score": 9}, r"^score: unknown score function"),
    ({"q": None}, r"^attention: q and out must be given"),
    ({"out": None}, r"^attention: q and out must be given"),
]


def test_check_params_accepts_a_valid_struct():
    _core._check_params({})
    _core._check_params({"scale": 1e20, "dtype": 1})  # float64 accumulates in double
    _core._check_params({"num_threads": 4096, "window_left": 0, "window_right": 2**63 - 1})
    _core._check_params({"key_lengths": [0, 5], "causal": 2, "device": 1})
    _core._check_params({"batch": 0, "q": None, "out": None})  # no work: no pointers needed


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[m for _, m in BAD])
def test_check_params_refuses(overrides, message):
    with pytest.raises(ValueError, match=message):
        _core._check_params(overrides)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_threads": 0}, r"^num_threads: expected None \(the OpenMP default\)"),
        ({"num_threads": 5000}, r"^num_threads: expected None \(the OpenMP default\)"),
        ({"window": (-3, 0)}, r"^window: expected \(left, right\)"),
        ({"scale": np.inf}, r"^scale: must be finite"),
    ],
)
def test_python_errors_use_the_check_params_wording(kwargs, message):
    q = np.ones((1, 2, 3, 8), np.float32)
    with pytest.raises(ValueError, match=message):
        mha_ext.attention(q, q, q, **kwargs)


# ------------------------------------------------------------------------------------------
# The argument table.


def test_attention_args_table():
    names = _core.ATTENTION_ARGS
    assert names[:3] == ("q", "k", "v")
    assert len(set(names)) == len(names)
    assert _attention._CORE_ARGS == names[: len(_attention._CORE_ARGS)]


def test_core_pyi_follows_the_table():
    stub = Path(_core.__file__).with_name("_core.pyi")
    if not stub.exists():  # an in-tree run: the stub beside the sources
        stub = Path(__file__).parents[1] / "python" / "mha_ext" / "_core.pyi"
    tree = ast.parse(stub.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "attention")
    assert tuple(a.arg for a in fn.args.args) == _core.ATTENTION_ARGS
    enums = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    for name in ("Causal", "Device", "Score"):
        members = {
            t.targets[0].id: t.value.value for t in enums[name].body if isinstance(t, ast.Assign)
        }
        assert members == {m.name: m.value for m in getattr(_core, name)}, name


def test_keyword_and_positional_calls_agree(rng):
    q, k, v = (rng.standard_normal((2, 3, 5, 8)).astype(np.float32) for _ in range(3))
    mask = rng.random((5, 5)) < 0.7
    pos = _core.attention(q, k, v, mask, None, _core.Causal.TOP_LEFT, 2, 1, None, 0.5)
    kw = _core.attention(
        q, k, v, mask=mask, causal=_core.Causal.TOP_LEFT, window_left=2, window_right=1,
        scale=0.5,
    )
    np.testing.assert_array_equal(pos, kw)
    np.testing.assert_array_equal(
        kw, mha_ext.attention(q, k, v, mask=mask, causal="top_left", window=(2, 1), scale=0.5)
    )
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        _core.attention(q, k, v, bogus=1)
    with pytest.raises(TypeError, match="'mask' given twice"):
        _core.attention(q, k, v, None, mask=None)


def test_enums_are_the_python_codes():
    assert _core.Causal.NONE == 0 and _core.Causal.BOTTOM_RIGHT == 1 and _core.Causal.TOP_LEFT == 2
    assert _core.Device.CPU == 0 and _core.Device.CUDA == 1
    assert [s.name for s in _core.Score] == ["SCALED_DOT", "DOT", "GENERAL", "ADDITIVE"]
    assert _attention._CAUSAL[True] is _core.Causal.BOTTOM_RIGHT
    assert _attention._SCORES["dot"] is _core.Score.DOT


# ------------------------------------------------------------------------------------------
# Instruction sets.

_PATH_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from reference import attention_ref
    import mha_ext

    info = mha_ext.build_info()
    assert info["simd"] == sys.argv[2], info
    rng = np.random.default_rng(5)
    for dtype, tol in ((np.float32, 1e-5), (np.float64, 1e-12)):
        for (Lq, Lk, D, Dv) in ((1, 300, 64, 64), (37, 53, 16, 24), (130, 97, 80, 16)):
            q, k, v = (rng.standard_normal(s).astype(dtype)
                       for s in ((2, 4, Lq, D), (2, 2, Lk, D), (2, 2, Lk, Dv)))
            kw = dict(mask=rng.random((2, 1, Lq, Lk)) < 0.8, causal=True, window=(40, 2),
                      key_lengths=[Lk, Lk // 2])
            out, w, lse = mha_ext.attention(q, k, v, return_weights=True, return_lse=True, **kw)
            ro, rw, rl = attention_ref(q, k, v, **kw)
            for a, b in ((out, ro), (w, rw), (lse, rl)):
                np.testing.assert_allclose(a, b, rtol=tol, atol=tol)
    print("path ok", info["simd"])
    """
)


def _run(script, env, *args):
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=180,
    )


def test_simd_table_in_build_info():
    info = mha_ext.build_info()
    assert info["simd_supported"], info
    assert info["simd_supported"][-1] == "generic"
    if os.environ.get("MHA_EXT_SIMD"):
        assert info["simd"] == os.environ["MHA_EXT_SIMD"]
    else:
        assert info["simd"] == info["simd_supported"][0]


@pytest.mark.parametrize("path", mha_ext.build_info()["simd_supported"])
def test_each_supported_path(path):
    """Every path this CPU supports, forced with MHA_EXT_SIMD, against the reference."""
    env = dict(os.environ, MHA_EXT_SIMD=path)
    proc = _run(_PATH_SCRIPT, env, str(Path(__file__).parent), path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert f"path ok {path}" in proc.stdout


@pytest.mark.parametrize("name", ["avx9", "AVX2", "avx2+fma"])
def test_unknown_simd_name_is_a_clear_error(name):
    script = textwrap.dedent(
        """
        import numpy as np
        import mha_ext
        info = mha_ext.build_info()  # importing and build_info() never fail
        assert info["simd"] is None and "MHA_EXT_SIMD=" in info["simd_error"], info
        q = np.ones((1, 1, 4, 8), np.float32)
        try:
            mha_ext.attention(q, q, q)
        except RuntimeError as e:
            print("error:", e)
        else:
            raise SystemExit("no error")
        """
    )
    proc = _run(script, dict(os.environ, MHA_EXT_SIMD=name))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    msg = proc.stdout
    assert f"MHA_EXT_SIMD={name}" in msg
    for supported in mha_ext.build_info()["simd_supported"]:
        assert supported in msg.split("supports are:")[1], msg


# ------------------------------------------------------------------------------------------
# Shape errors that say the fix (issue 14, point 4).


def test_padding_mask_hint():
    q = np.ones((2, 4, 3, 8), np.float32)
    k = np.ones((2, 4, 5, 8), np.float32)
    pad = np.ones((2, 5), bool)
    with pytest.raises(ValueError, match=r"^mask: .*pass mask\[:, None, None, :\]"):
        mha_ext.attention(q, k, k, mask=pad)
    with pytest.raises(ValueError, match=r"^bias: .*pass bias\[:, None, None, :\]"):
        mha_ext.attention(q, k, k, bias=pad.astype(np.float32))
    # The hint's spelling works.
    mha_ext.attention(q, k, k, mask=pad[:, None, None, :])
    # Other broadcast errors carry no padding hint.
    with pytest.raises(ValueError, match=r"^mask: ") as e:
        mha_ext.attention(q, k, k, mask=np.ones((4, 5), bool))
    assert "None, None" not in str(e.value)


def test_rank_mismatch_says_same_rank():
    q = np.ones((3, 8), np.float32)
    k = np.ones((1, 2, 5, 8), np.float32)
    with pytest.raises(ValueError, match=r"^k: .*q, k and v must all have the same rank"):
        mha_ext.attention(q, k, k)
    with pytest.raises(ValueError, match=r"^v: .*q, k and v must all have the same rank"):
        mha_ext.attention(q, q, k)
