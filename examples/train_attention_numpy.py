"""Train one multi-head attention layer with NumPy only: mha_ext.attention_backward.

A "teacher" attention layer with random weights maps random token sequences to outputs; a
"student" layer of the same shape, started from other random weights, learns to reproduce
them by plain gradient descent on the mean squared error. The projections' gradients are
NumPy matrix products; the attention's gradients come from ``mha_ext.attention_backward``
(the forward keeps ``lse`` for it). The script checks that the loss falls at least tenfold
and that one gradient entry matches a finite difference.

Run: ``python examples/train_attention_numpy.py [--steps 300]``
"""

from __future__ import annotations

import argparse

import numpy as np

import mha_ext

B, L, E, H = 8, 24, 32, 4
DH = E // H


def init(rng):
    return {n: rng.standard_normal((E, E)).astype(np.float32) / np.sqrt(E)
            for n in ("Wq", "Wk", "Wv", "Wo")}


def split(x):  # (B, L, E) -> (B, L, H, DH): the "blhd" layout, no copy
    return x.reshape(B, L, H, DH)


def forward(w, x):
    q, k, v = (split(x @ w[n]) for n in ("Wq", "Wk", "Wv"))
    o, lse = mha_ext.attention(q, k, v, causal=True, layout="blhd", return_lse=True)
    return o.reshape(B, L, E) @ w["Wo"], (q, k, v, o, lse)


def loss_and_grads(w, x, y):
    pred, (q, k, v, o, lse) = forward(w, x)
    diff = pred - y
    loss = float(np.mean(diff**2))
    dpred = 2 * diff / diff.size
    grads = {"Wo": o.reshape(-1, E).T @ dpred.reshape(-1, E)}
    do = split(dpred @ w["Wo"].T)
    dq, dk, dv = mha_ext.attention_backward(do, q, k, v, o, lse, causal=True, layout="blhd")
    for n, g in (("Wq", dq), ("Wk", dk), ("Wv", dv)):
        grads[n] = x.reshape(-1, E).T @ g.reshape(-1, E)
    return loss, grads


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=5.0)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    teacher, student = init(rng), init(rng)

    # A finite-difference check of one entry of dWq (float64 copies of everything).
    x64 = rng.standard_normal((B, L, E))
    w64 = {n: a.astype(np.float64) for n, a in student.items()}
    y64 = forward({n: a.astype(np.float64) for n, a in teacher.items()}, x64)[0]
    _, g = loss_and_grads(w64, x64, y64)
    eps = 1e-6
    w64["Wq"][3, 5] += eps
    up = loss_and_grads(w64, x64, y64)[0]
    w64["Wq"][3, 5] -= 2 * eps
    down = loss_and_grads(w64, x64, y64)[0]
    fd = (up - down) / (2 * eps)
    fd_ok = abs(fd - g["Wq"][3, 5]) <= 1e-6 * max(1.0, abs(fd))
    print(f"dWq[3, 5]: attention_backward {g['Wq'][3, 5]:.8f}, finite difference {fd:.8f}")

    losses = []
    for step in range(args.steps):
        x = rng.standard_normal((B, L, E)).astype(np.float32)
        y = forward(teacher, x)[0]
        loss, grads = loss_and_grads(student, x, y)
        for n in student:
            student[n] -= args.lr * grads[n]
        losses.append(loss)
        if step % max(1, args.steps // 6) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss:.5f}")
    drop = losses[0] / np.mean(losses[-10:])
    print(f"loss fell {drop:.1f}x")
    ok = fd_ok and drop >= 10
    print("CHECK OK" if ok else "CHECK FAILED")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
