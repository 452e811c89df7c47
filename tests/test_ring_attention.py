"""Ring attention (kernels/ring.py) on 8 simulated CPU devices.

Values and gradients against a float64 numpy reference written here, for the
zig-zag and contiguous layouts, several meshes (sequence=8, data=2 x sequence=4,
tensor=2 x sequence=4), GQA, packed documents that cross device boundaries and
padding; then the "ring" backend of ``dot_product_attention`` and a decoder
whose sequence axis is sharded 4 ways against the same decoder unsharded.
"""

from __future__ import annotations

import dataclasses
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_like import partitioning as part
from t5x_like.kernels import ring
from t5x_like.kernels.attention import IMPLEMENTATIONS, dot_product_attention
from t5x_like.models import DecoderConfig, build

# ------------------------------------------------------------ float64 reference


def reference(q, k, v, seg, causal, d_out):
    """Dense attention and its gradients for the loss sum(out * d_out), in float64."""
    q, k, v, d_out = (np.asarray(x, np.float64) for x in (q, k, v, d_out))
    b, t, h, d = q.shape
    g = h // k.shape[2]
    ke, ve = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    mask = np.ones((b, t, t), bool)
    if causal:
        mask &= np.tril(np.ones((t, t), bool))[None]
    if seg is not None:
        seg = np.asarray(seg)
        mask &= seg[:, :, None] == seg[:, None, :]
    mask = mask[:, None]
    s = np.where(mask, np.einsum("bqhd,bkhd->bhqk", q, ke) / np.sqrt(d), -np.inf)
    row_max = s.max(-1, keepdims=True)
    e = np.where(mask, np.exp(s - np.where(np.isfinite(row_max), row_max, 0.0)), 0.0)
    denom = e.sum(-1, keepdims=True)
    p = e / np.where(denom == 0, 1.0, denom)
    out = np.einsum("bhqk,bkhd->bqhd", p, ve)
    dp = np.einsum("bqhd,bkhd->bhqk", d_out, ve)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) / np.sqrt(d)
    dq = np.einsum("bhqk,bkhd->bqhd", ds, ke)
    dk = np.einsum("bhqk,bqhd->bkhd", ds, q).reshape(b, t, -1, g, d).sum(3)
    dv = np.einsum("bhqk,bqhd->bkhd", p, d_out).reshape(b, t, -1, g, d).sum(3)
    return out, dq, dk, dv


def rel_err(got, want):
    got = np.asarray(got, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


# ------------------------------------------------------------------------ inputs

BATCH, LENGTH, HEAD_DIM = 4, 96, 8  # LENGTH / 16 = 6: zig-zag chunks of 6 on 8 devices


def packed_ids(rng, batch, length, padding=True):
    """Up to 8 documents per row (ids 1, 2, ...), then padding (id 0).

    Cut points are random, so documents start and end anywhere, across device
    boundaries too; row 0 begins with two one-token documents.
    """
    ids = np.zeros((batch, length), np.int32)
    for row in range(batch):
        end = length - (int(rng.integers(1, length // 6)) if padding else 0)
        cuts = rng.choice(np.arange(1, end), size=int(rng.integers(0, 6)), replace=False)
        if row == 0:
            cuts = np.concatenate([cuts, [1, 2]])
        bounds = np.concatenate([[0], np.unique(cuts), [end]])
        for doc, (a, z) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
            ids[row, a:z] = doc
    return ids


def random_qkv(rng, heads, kv_heads, length=LENGTH, batch=BATCH):
    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    q = normal(batch, length, heads, HEAD_DIM)
    k = normal(batch, length, kv_heads, HEAD_DIM)
    v = normal(batch, length, kv_heads, HEAD_DIM)
    return q, k, v, normal(batch, length, heads, HEAD_DIM)


def mesh_of(**axes):
    """A mesh with these axis sizes (the others 1) over the first devices it needs."""
    axes = {"data": 1, **axes}
    return part.make_mesh(axes, devices=jax.devices()[:int(np.prod(list(axes.values())))])


# ------------------------------------------------------- ring_attention vs reference

# (name, mesh axes, causal, segments, heads, kv_heads, layout, block_sizes)
# segments: None, "packed" (documents + padding), "padding" (one document, padded end)
CASES = [
    ("causal-seq8-zigzag-gqa4", dict(sequence=8), True, None, 4, 1, "zigzag", (4, 4)),
    ("causal-packed-seq8-zigzag-mha", dict(sequence=8), True, "packed", 2, 2, "zigzag", (4, 8)),
    ("causal-packed-seq8-contig-gqa4", dict(sequence=8), True, "packed", 4, 1, "contiguous", (5, 3)),
    ("causal-packed-data2-seq4-zigzag", dict(data=2, sequence=4), True, "packed", 4, 1, "zigzag",
     None),
    ("causal-packed-data2-seq4-contig", dict(data=2, sequence=4), True, "packed", 2, 2,
     "contiguous", (8, 8)),
    ("causal-packed-tensor2-seq4-zigzag", dict(tensor=2, sequence=4), True, "packed", 8, 2,
     "zigzag", (4, 4)),
    ("bidir-padding-seq8-zigzag-gqa4", dict(sequence=8), False, "padding", 4, 1, "zigzag", (4, 4)),
    ("bidir-packed-data2-seq4-contig", dict(data=2, sequence=4), False, "packed", 2, 2,
     "contiguous", None),
]


def segment_ids_for(kind, rng):
    if kind is None:
        return None
    if kind == "padding":
        lengths = rng.integers(LENGTH // 2, LENGTH, size=BATCH)
        return (np.arange(LENGTH)[None] < lengths[:, None]).astype(np.int32)
    return packed_ids(rng, BATCH, LENGTH)


def ring_values_and_grads(mesh, q, k, v, seg, d_out, **kwargs):
    def loss(q, k, v):
        out = ring.ring_attention(q, k, v, segment_ids=seg, **kwargs)
        return jnp.sum(out * d_out), out

    with jax.set_mesh(mesh):
        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return (out,) + tuple(grads)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_reference(case):
    name, axes, causal, segments, heads, kv_heads, layout, blocks = case
    rng = np.random.default_rng(zlib.crc32(name.encode()))  # stable across processes
    q, k, v, d_out = random_qkv(rng, heads, kv_heads)
    seg = segment_ids_for(segments, rng)
    got = ring_values_and_grads(
        mesh_of(**axes), q, k, v, None if seg is None else jnp.asarray(seg), d_out,
        causal=causal, layout=layout, block_sizes=blocks,
    )
    want = reference(q, k, v, seg, causal, d_out)
    for label, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == jnp.float32 and g.shape == w.shape
        assert np.all(np.isfinite(np.asarray(g))), f"{name} {label}: not finite"
        err = rel_err(g, w)
        assert err <= 1e-5, f"{name} {label}: rel. error {err:.2e}"


def test_pre_permuted_zigzag_inputs():
    """permute=False: q, k, v and ids already in zig-zag order, output in zig-zag order."""
    rng = np.random.default_rng(7)
    n = 4
    q, k, v, d_out = random_qkv(rng, 4, 2)
    seg = packed_ids(rng, BATCH, LENGTH)
    zz = [ring.to_zigzag(x, n) for x in (q, k, v, jnp.asarray(seg), d_out)]
    got = ring_values_and_grads(
        mesh_of(data=2, sequence=n), *zz[:3], zz[3], zz[4], causal=True, permute=False,
        block_sizes=(4, 4),
    )
    want = reference(q, k, v, seg, True, d_out)
    for label, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        err = rel_err(ring.from_zigzag(g, n), w)
        assert err <= 1e-5, f"pre-permuted {label}: rel. error {err:.2e}"


def test_rows_that_see_nothing_are_zero():
    """Queries whose document has no key (distinct q / kv ids) give zeros, not NaN."""
    rng = np.random.default_rng(3)
    q, k, v, d_out = random_qkv(rng, 2, 1, batch=2)
    q_seg = np.ones((2, LENGTH), np.int32)
    q_seg[:, 40:60] = 9  # id 9 has no keys
    kv_seg = np.ones((2, LENGTH), np.int32)

    def loss(q, k, v):
        out = ring.ring_attention(q, k, v, causal=True, segment_ids=jnp.asarray(q_seg),
                                  kv_segment_ids=jnp.asarray(kv_seg), block_sizes=(4, 4))
        return jnp.sum(out * d_out), out

    with jax.set_mesh(mesh_of(sequence=8)):
        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    assert np.all(np.asarray(out[:, 40:60]) == 0)
    assert np.all(np.asarray(grads[0][:, 40:60]) == 0)
    for x in (out,) + grads:
        assert np.all(np.isfinite(np.asarray(x)))
    mask = q_seg[:, :, None] == kv_seg[:, None, :]
    want = reference(q, k, v, None, True, d_out)  # row-wise, the seen rows are plain causal
    assert mask[:, :40].all()
    assert rel_err(out[:, :40], want[0][:, :40]) <= 1e-5


# ----------------------------------------------------------- layout helpers, errors


def test_zigzag_helpers():
    n = 4
    x = jnp.arange(2 * 16).reshape(2, 16)
    z = ring.to_zigzag(x, n)
    # 8 chunks of 2; device i holds chunks i and 7 - i.
    np.testing.assert_array_equal(z[0], [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9])
    np.testing.assert_array_equal(ring.from_zigzag(z, n), x)
    np.testing.assert_array_equal(ring.zigzag_chunk_order(n), [0, 7, 1, 6, 2, 5, 3, 4])


def test_zigzag_needs_length_divisible_by_twice_the_ring():
    q = jnp.zeros((2, 36, 2, HEAD_DIM))  # 36 = 4.5 * 8
    with jax.set_mesh(mesh_of(sequence=4)):
        with pytest.raises(ValueError, match="length 36 must divide into 2 \\* sequence = 8"):
            ring.ring_attention(q, q, q, causal=True)
    with pytest.raises(ValueError, match="length 36 must divide into"):
        ring.to_zigzag(q, 4)


def test_kv_heads_must_divide_tensor():
    q = jnp.zeros((2, 32, 4, HEAD_DIM))
    k = jnp.zeros((2, 32, 1, HEAD_DIM))
    with jax.set_mesh(mesh_of(tensor=2, sequence=4)):
        with pytest.raises(ValueError, match="kv_heads=1 does not divide mesh axis 'tensor'"):
            ring.ring_attention(q, k, k, causal=True)


def test_needs_a_mesh():
    q = jnp.zeros((1, 16, 1, HEAD_DIM))
    with pytest.raises(ValueError, match="needs a mesh"):
        ring.ring_attention(q, q, q, causal=True)


# -------------------------------------------------------------- the "ring" backend


def test_backend_registered_and_falls_back_without_a_ring():
    assert "ring" in IMPLEMENTATIONS
    rng = np.random.default_rng(5)
    q, k, v, _ = random_qkv(rng, 4, 2)
    seg = jnp.asarray(packed_ids(rng, BATCH, LENGTH))
    want = dot_product_attention(q, k, v, causal=True, segment_ids=seg)
    # No mesh, and a mesh whose sequence axis has size 1: the chunked backend.
    got = dot_product_attention(q, k, v, causal=True, segment_ids=seg, implementation="ring")
    assert rel_err(got, np.asarray(want, np.float64)) <= 1e-5
    with jax.set_mesh(mesh_of(data=8)):
        got = jax.jit(lambda q, k, v: dot_product_attention(
            q, k, v, causal=True, segment_ids=seg, implementation="ring"))(q, k, v)
    assert rel_err(got, np.asarray(want, np.float64)) <= 1e-5


def test_backend_under_a_sequence_mesh():
    """The backend finds the mesh of jax.set_mesh (gradients: test_matches_reference)."""
    rng = np.random.default_rng(6)
    q, k, v, d_out = random_qkv(rng, 4, 2)
    seg = packed_ids(rng, BATCH, LENGTH)

    def attend(q, k, v):
        return dot_product_attention(q, k, v, causal=True, segment_ids=jnp.asarray(seg),
                                     implementation="ring", block_sizes=(8, 8))

    with jax.set_mesh(mesh_of(data=2, sequence=4)):
        out = jax.jit(attend)(q, k, v)
        with pytest.raises(ValueError, match="does not support sliding_window"):
            dot_product_attention(q, k, v, causal=True, implementation="ring", sliding_window=4)
    assert rel_err(out, reference(q, k, v, seg, True, d_out)[0]) <= 1e-5


# ----------------------------------------------------------------------- decoder

DECODER = DecoderConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                        head_dim=8, mlp_dim=64, max_position_embeddings=64, scan_layers=True)


@pytest.mark.slow
def test_decoder_sequence_sharded_matches_unsharded():
    """Loss and gradients of a packed batch: ring over sequence=4 vs one device, no mesh."""
    batch, length = 2, 32
    rng = np.random.default_rng(11)
    seg = packed_ids(rng, batch, length)
    positions = np.zeros_like(seg)
    for row in range(batch):
        for doc in np.unique(seg[row]):
            where = seg[row] == doc
            positions[row, where] = np.arange(where.sum())
    tokens = rng.integers(1, DECODER.vocab_size, size=(batch, length)).astype(np.int32)
    weights = jnp.asarray(rng.standard_normal((batch, length, DECODER.vocab_size)), jnp.float32)

    def loss_fn(model):
        def loss(params, tokens, seg, positions):
            logits = model.apply({"params": params}, tokens, segment_ids=seg, positions=positions)
            return jnp.mean(logits * weights)

        return jax.value_and_grad(loss)

    reference_model = build(DECODER)
    params = nn.unbox(reference_model.init(jax.random.key(0), tokens[:, :8]))["params"]
    want_loss, want_grads = jax.jit(loss_fn(reference_model))(params, tokens, seg, positions)

    ring_model = build(dataclasses.replace(DECODER, attention="ring"))
    mesh = mesh_of(data=2, sequence=4)
    inputs = jax.device_put((tokens, seg, positions), part.batch_sharding(mesh, 2))
    with jax.set_mesh(mesh):
        step = jax.jit(loss_fn(ring_model)).lower(params, *inputs).compile()
    got_loss, got_grads = step(params, *inputs)
    # The ring runs, and keys / values stay split along length: nothing is all-gathered.
    hlo = step.as_text()
    assert "collective-permute" in hlo and "all-gather" not in hlo
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    flat_want = jax.tree_util.tree_leaves_with_path(want_grads)
    for (path, w), g in zip(flat_want, jax.tree.leaves(got_grads)):
        err = rel_err(g, np.asarray(w, np.float64))
        assert err <= 1e-5, f"grad {jax.tree_util.keystr(path)}: rel. error {err:.2e}"
