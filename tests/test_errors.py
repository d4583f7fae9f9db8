"""Invalid inputs (SPEC section 4): ValueError for shapes/values, TypeError for dtypes, each
message naming the argument; nothing may crash, hang or return garbage."""

from __future__ import annotations

import mha_ext
import ml_dtypes
import numpy as np
import pytest

B, HQ, HK, LQ, LK, D, DV = 2, 4, 2, 5, 7, 8, 6


@pytest.fixture
def qkv(rng):
    return (
        rng.standard_normal((B, HQ, LQ, D)).astype(np.float32),
        rng.standard_normal((B, HK, LK, D)).astype(np.float32),
        rng.standard_normal((B, HK, LK, DV)).astype(np.float32),
    )


def test_valid_call_sanity(qkv):
    assert mha_ext.attention(*qkv).shape == (B, HQ, LQ, DV)


# ------------------------------------------------------------------------------------------
# Ranks and shapes.


@pytest.mark.parametrize("shape", [(D,), (1, B, HQ, LQ, D), ()], ids=str)
def test_wrong_rank_q(shape):
    q = np.ones(shape, np.float32)
    with pytest.raises(ValueError, match=r"^q: .*dimensions") as e:
        mha_ext.attention(q, q, q)
    assert str(shape) in str(e.value)


def test_rank_mismatch_k(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"^k: .*dimensions") as e:
        mha_ext.attention(q, k[0], v)
    assert str(k[0].shape) in str(e.value)


def test_rank_mismatch_v(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"^v: .*dimensions"):
        mha_ext.attention(q, k, v[0])


def test_batch_mismatch(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"k, v: batch"):
        mha_ext.attention(q, k[:1], v[:1])
    with pytest.raises(ValueError, match=r"k, v: batch"):
        mha_ext.attention(q, k, v[:1])


def test_kv_heads_mismatch(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"^v: number of heads"):
        mha_ext.attention(q, k, v[:, :1])


def test_kv_length_mismatch(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"^v: sequence length"):
        mha_ext.attention(q, k, v[:, :, :3])


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_hq_not_multiple_of_hk(rng, layout):
    q = np.ones((1, 4, 5, 8), np.float32)
    k = np.ones((1, 3, 5, 8), np.float32)
    if layout == "blhd":
        q, k = q.swapaxes(1, 2), k.swapaxes(1, 2)
    with pytest.raises(ValueError, match=r"q, k: .*multiple"):
        mha_ext.attention(q, k, k, layout=layout)


def test_zero_kv_heads(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"^k: .*heads"):
        mha_ext.attention(q, k[:, :0], v[:, :0])


def test_head_dim_zero():
    q = np.ones((1, 2, 5, 0), np.float32)
    v = np.ones((1, 2, 5, 4), np.float32)
    with pytest.raises(ValueError, match=r"^q: the head dimension D"):
        mha_ext.attention(q, q, v)


def test_dot_head_dim_mismatch(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"^k: head dimension"):
        mha_ext.attention(q, k[..., :3], v)
    with pytest.raises(ValueError, match=r"^k: head dimension"):
        mha_ext.attention(q, k[..., :3], v, score="dot")


# ------------------------------------------------------------------------------------------
# mask and bias.


@pytest.mark.parametrize("dtype", [np.float32, np.int64, np.uint8, np.float16])
def test_non_bool_mask(qkv, dtype):
    mask = np.ones((LQ, LK), dtype)
    with pytest.raises(TypeError, match=r"^mask: ") as e:
        mha_ext.attention(*qkv, mask=mask)
    msg = str(e.value)
    assert "bias=" in msg
    assert "== 0" in msg
    assert np.dtype(dtype).name in msg


def test_object_mask(qkv):
    with pytest.raises(TypeError, match=r"^mask: "):
        mha_ext.attention(*qkv, mask=np.array([None] * LK, dtype=object))


@pytest.mark.parametrize(
    "shape",
    [(LK + 1,), (LQ + 1, LK), (3, 1, 1, LK), (1, HQ + 1, 1, 1), (1, 1, 1, 1, 1), (LK, LQ)],
    ids=str,
)
@pytest.mark.parametrize("which", ["mask", "bias"])
def test_unbroadcastable_mask_bias(qkv, shape, which):
    arr = np.ones(shape, bool) if which == "mask" else np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match=rf"^{which}: shape .*not broadcastable"):
        mha_ext.attention(*qkv, **{which: arr})


def test_unbroadcastable_mask_low_rank(rng):
    q = rng.standard_normal((LQ, D)).astype(np.float32)
    k = rng.standard_normal((LK, D)).astype(np.float32)
    with pytest.raises(ValueError, match=r"^mask: "):
        mha_ext.attention(q, k, k, mask=np.ones((LK, LQ), bool))


def test_bool_bias(qkv):
    with pytest.raises(TypeError, match=r"^bias: .*bool.*mask="):
        mha_ext.attention(*qkv, bias=np.ones((LQ, LK), bool))


@pytest.mark.parametrize(
    "bias", [np.array(["a"] * LK), np.ones(LK, np.complex64)], ids=["str", "complex"]
)
def test_non_real_bias(qkv, bias):
    with pytest.raises(TypeError, match=r"^bias: "):
        mha_ext.attention(*qkv, bias=bias)


# ------------------------------------------------------------------------------------------
# key_lengths.


@pytest.mark.parametrize(
    "kl",
    [np.array([3]), np.array([3, 3, 3]), np.array([[3, 3]]), np.array(3)],
    ids=["short", "long", "2d", "scalar"],
)
def test_key_lengths_wrong_shape(qkv, kl):
    with pytest.raises(ValueError, match=r"^key_lengths: expected shape \(B,\)"):
        mha_ext.attention(*qkv, key_lengths=kl)


@pytest.mark.parametrize(
    "kl", [[-1, 3], [3, LK + 1], [2**40, 0]], ids=["negative", "above_lk", "huge"]
)
@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_key_lengths_out_of_range(qkv, kl, dtype):
    if dtype == np.int32 and max(kl) > 2**31:
        pytest.skip("does not fit int32")
    with pytest.raises(ValueError, match=r"^key_lengths: entry"):
        mha_ext.attention(*qkv, key_lengths=np.array(kl, dtype=dtype))


def test_key_lengths_uint64_too_large(qkv):
    with pytest.raises(ValueError, match=r"^key_lengths: "):
        mha_ext.attention(*qkv, key_lengths=np.array([2**63 + 5, 1], dtype=np.uint64))


@pytest.mark.parametrize(
    "kl", [np.array([3.0, 2.0]), np.array([True, False])], ids=["float", "bool"]
)
def test_key_lengths_dtype(qkv, kl):
    with pytest.raises(TypeError, match=r"^key_lengths: "):
        mha_ext.attention(*qkv, key_lengths=kl)


# ------------------------------------------------------------------------------------------
# window, causal, layout, device, num_threads, scale.


@pytest.mark.parametrize("window", [(-2, 0), (0, -2), (-5, -5)], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_window_below_minus_one(qkv, window, causal):
    with pytest.raises(ValueError, match=r"^window: "):
        mha_ext.attention(*qkv, window=window, causal=causal)


@pytest.mark.parametrize("window", [5, (1, 2, 3), "abc", (1,)], ids=str)
def test_window_not_a_pair(qkv, window):
    with pytest.raises(ValueError, match=r"^window: "):
        mha_ext.attention(*qkv, window=window)


@pytest.mark.parametrize("window", [(1.5, 2), (1, "2"), (True, 1), "ab"], ids=str)
def test_window_wrong_element_type(qkv, window):
    with pytest.raises(TypeError, match=r"^window: "):
        mha_ext.attention(*qkv, window=window)


@pytest.mark.parametrize(
    "causal", ["yes", 2, "bottom-right", "TOP_LEFT", "causal", 0.5, [True]], ids=str
)
def test_bad_causal(qkv, causal):
    with pytest.raises(ValueError, match=r"^causal: "):
        mha_ext.attention(*qkv, causal=causal)


@pytest.mark.parametrize("layout", ["bshd", "BHLD", None, "bhl"])
def test_bad_layout(qkv, layout):
    with pytest.raises(ValueError, match=r"^layout: "):
        mha_ext.attention(*qkv, layout=layout)


@pytest.mark.parametrize("device", ["gpu", "CPU", "cuda:0", None])
def test_bad_device(qkv, device):
    with pytest.raises(ValueError, match=r"^device: "):
        mha_ext.attention(*qkv, device=device)


@pytest.mark.skipif(mha_ext.cuda_available(), reason="a GPU is visible")
def test_cuda_unavailable(qkv):
    with pytest.raises(RuntimeError, match=r"cuda"):
        mha_ext.attention(*qkv, device="cuda")
    # "auto" falls back to the CPU.
    np.testing.assert_array_equal(mha_ext.attention(*qkv, device="auto"), mha_ext.attention(*qkv))


@pytest.mark.skipif(mha_ext.cuda_available(), reason="a GPU is visible")
def test_cuda_unavailable_empty_input(qkv):
    """SPEC section 2: device="cuda" without a GPU raises, whatever the sizes."""
    q, k, v = qkv
    with pytest.raises(RuntimeError, match=r"cuda"):
        mha_ext.attention(q[:0], k[:0], v[:0], device="cuda")


@pytest.mark.parametrize("n", [0, -1, -100])
def test_bad_num_threads(qkv, n):
    with pytest.raises(ValueError, match=r"^num_threads: "):
        mha_ext.attention(*qkv, num_threads=n)


@pytest.mark.parametrize("n", [1.5, "2"])
def test_num_threads_type(qkv, n):
    with pytest.raises(TypeError, match=r"^num_threads: "):
        mha_ext.attention(*qkv, num_threads=n)


@pytest.mark.parametrize("scale", [np.nan, np.inf, -np.inf])
def test_non_finite_scale(qkv, scale):
    with pytest.raises(ValueError, match=r"^scale: "):
        mha_ext.attention(*qkv, scale=scale)


def test_scale_type(qkv):
    with pytest.raises(TypeError, match=r"^scale: "):
        mha_ext.attention(*qkv, scale="1.0")


# ------------------------------------------------------------------------------------------
# dtypes.


@pytest.mark.parametrize(
    ("dq", "dk", "dv"),
    [
        (np.float32, np.float64, np.float32),
        (np.float32, np.float32, np.float16),
        (np.float16, ml_dtypes.bfloat16, np.float16),
        (np.float64, np.float64, np.float32),
    ],
    ids=str,
)
def test_mixed_dtypes(qkv, dq, dk, dv):
    q, k, v = qkv
    with pytest.raises(TypeError) as e:
        mha_ext.attention(q.astype(dq), k.astype(dk), v.astype(dv))
    msg = str(e.value)
    for name in {np.dtype(dq).name, np.dtype(dk).name, np.dtype(dv).name}:
        assert name in msg


@pytest.mark.parametrize(
    "dtype", [np.int32, np.int64, np.uint8, bool, np.complex64, np.longdouble], ids=str
)
def test_non_float_inputs(qkv, dtype):
    q, k, v = (x.astype(dtype) for x in qkv)
    with pytest.raises(TypeError) as e:
        mha_ext.attention(q, k, v)
    assert np.dtype(dtype).name in str(e.value)


# ------------------------------------------------------------------------------------------
# out=


def test_out_wrong_shape(qkv):
    out = np.empty((B, HQ, LQ, DV + 1), np.float32)
    with pytest.raises(ValueError, match=r"^out: expected shape"):
        mha_ext.attention(*qkv, out=out)
    with pytest.raises(ValueError, match=r"^out: expected shape"):
        mha_ext.attention(*qkv, out=np.empty((B, LQ, HQ, DV), np.float32))  # blhd shape


def test_out_wrong_dtype(qkv):
    with pytest.raises(TypeError, match=r"^out: expected dtype float32"):
        mha_ext.attention(*qkv, out=np.empty((B, HQ, LQ, DV), np.float64))


def test_out_not_contiguous(qkv):
    out = np.empty((B, HQ, LQ, 2 * DV), np.float32)[..., ::2]
    with pytest.raises(ValueError, match=r"^out: .*contiguous"):
        mha_ext.attention(*qkv, out=out)
    out = np.empty((B, HQ, DV, LQ), np.float32).swapaxes(2, 3)
    with pytest.raises(ValueError, match=r"^out: .*contiguous"):
        mha_ext.attention(*qkv, out=out)


def test_out_read_only(qkv):
    out = np.empty((B, HQ, LQ, DV), np.float32)
    out.setflags(write=False)
    with pytest.raises(ValueError, match=r"^out: .*writeable"):
        mha_ext.attention(*qkv, out=out)


def test_out_overlaps_inputs(rng):
    q = rng.standard_normal((1, 2, 5, 8)).astype(np.float32)
    k = rng.standard_normal((1, 2, 5, 8)).astype(np.float32)
    v = rng.standard_normal((1, 2, 5, 8)).astype(np.float32)
    for target in (q, k, v):
        with pytest.raises(ValueError, match=r"^out: .*share memory"):
            mha_ext.attention(q, k, v, out=target)
    # Partial overlap: out is the second half of a buffer whose first part holds q.
    buf = rng.standard_normal(2 * 80 - 40).astype(np.float32)
    qv = buf[:80].reshape(1, 2, 5, 8)
    out = buf[40:].reshape(1, 2, 5, 8)
    with pytest.raises(ValueError, match=r"^out: .*share memory"):
        mha_ext.attention(qv, k, v, out=out)


def test_out_not_an_array(qkv):
    with pytest.raises(TypeError, match=r"^out: "):
        mha_ext.attention(*qkv, out=[0.0])


# ------------------------------------------------------------------------------------------
# Score objects.


def test_unknown_score(qkv):
    for score in ("cosine", 3, object()):
        with pytest.raises(ValueError, match=r"^score: "):
            mha_ext.attention(*qkv, score=score)


def test_general_wrong_shape(qkv):
    with pytest.raises(ValueError, match=r"^General.W: "):
        mha_ext.attention(*qkv, score=mha_ext.General(np.ones((D + 1, D))))
    with pytest.raises(ValueError, match=r"^General.W: "):
        mha_ext.attention(*qkv, score=mha_ext.General(np.ones((D, D + 1))))
    with pytest.raises(ValueError, match=r"^General.W: "):
        mha_ext.General(np.ones(D))
    with pytest.raises(TypeError, match=r"^General.W: "):
        mha_ext.General(np.array([["a"]]))


def test_additive_wrong_shape(qkv):
    A = 5
    ok = (np.ones((D, A)), np.ones((D, A)), np.ones(A))
    mha_ext.attention(*qkv, score=mha_ext.Additive(*ok))
    with pytest.raises(ValueError, match=r"W_q"):
        mha_ext.attention(*qkv, score=mha_ext.Additive(np.ones((D + 1, A)), ok[1], ok[2]))
    with pytest.raises(ValueError, match=r"W_k"):
        mha_ext.attention(*qkv, score=mha_ext.Additive(ok[0], np.ones((D - 1, A)), ok[2]))
    with pytest.raises(ValueError, match=r"W_q"):
        mha_ext.Additive(np.ones((D, A + 1)), ok[1], ok[2])
    with pytest.raises(ValueError, match=r"Additive.w"):
        mha_ext.Additive(ok[0], ok[1], np.ones((A, 1)))
    with pytest.raises(ValueError, match=r"\bw\b"):
        mha_ext.attention(
            *qkv, score=mha_ext.Additive(np.ones((D, 0)), np.ones((D, 0)), np.ones(0))
        )


def test_concat_wrong_shape(qkv):
    A = 5
    mha_ext.attention(*qkv, score=mha_ext.Concat(np.ones((2 * D, A)), np.ones(A)))
    for rows in (D, D - 1, 2 * D + 1, 2 * D - 1):
        with pytest.raises(ValueError, match=r"W"):
            mha_ext.attention(*qkv, score=mha_ext.Concat(np.ones((rows, A)), np.ones(A)))
    with pytest.raises(ValueError, match=r"Concat.W"):
        mha_ext.Concat(np.ones((2 * D, A + 1)), np.ones(A))
    with pytest.raises(ValueError, match=r"Concat.w"):
        mha_ext.Concat(np.ones((2 * D, A)), np.ones((A, 1)))


# ------------------------------------------------------------------------------------------
# Errors come before any native work: out= is left untouched.


def test_out_untouched_on_error(qkv):
    out = np.full((B, HQ, LQ, DV), 3.0, np.float32)
    with pytest.raises(ValueError, match=r"^key_lengths: "):
        mha_ext.attention(*qkv, key_lengths=np.array([1, LK + 1]), out=out)
    with pytest.raises(ValueError, match=r"^window: "):
        mha_ext.attention(*qkv, window=(-3, 0), out=out)
    assert np.all(out == 3.0)
