"""DLPack: attention and the layer take tensors of other libraries (CPU PyTorch tensors, any
`__dlpack__` producer) without copying them, and refuse what cannot be shared with a
TypeError that says how to convert."""
import numpy as np
import pytest

import cattn
from cattn._interop import from_dlpack
from conftest import reference64, tolerance


class Producer:
    """A minimal DLPack producer that is not an ndarray: it lends an array's memory."""

    def __init__(self, array):
        self.array = array

    def __dlpack__(self, **kwargs):
        return self.array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.array.__dlpack_device__()


def test_any_producer_is_viewed_not_copied(rng):
    q, k, v = (rng.standard_normal((2, 3, 5, 8), dtype=np.float32) for _ in range(3))
    view = from_dlpack(Producer(q), "query")
    assert isinstance(view, np.ndarray) and np.shares_memory(view, q)
    out = cattn.scaled_dot_product_attention(Producer(q), Producer(k), Producer(v),
                                             is_causal=True)
    want = reference64(q, k, v, is_causal=True)
    np.testing.assert_allclose(out, want, **tolerance(np.float32))
    written = np.zeros_like(q)
    cattn.scaled_dot_product_attention(q, k, v, is_causal=True, out=Producer(written))
    np.testing.assert_array_equal(written, out)  # the producer's memory received the result
    assert from_dlpack(None, "x") is None and from_dlpack(q, "x") is q


def test_torch_tensors_zero_copy(rng):
    torch = pytest.importorskip("torch")
    q, k, v = (torch.from_numpy(rng.standard_normal((2, 4, 6, 16), dtype=np.float32))
               for _ in range(3))
    assert np.shares_memory(from_dlpack(q, "query"), q.numpy())
    keep = torch.from_numpy(rng.random((6, 6)) < 0.7)
    keep[:, 0] = True
    got = cattn.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep).numpy()
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    out = torch.empty_like(q)
    cattn.scaled_dot_product_attention(q, k, v, attn_mask=keep, out=out)
    np.testing.assert_array_equal(out.numpy(), got)


def test_layer_takes_torch_tensors(rng):
    torch = pytest.importorskip("torch")
    torch_mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    mha = cattn.MultiHeadAttention(32, 4)
    mha.load_state_dict(torch_mha.state_dict())
    x = torch.from_numpy(rng.standard_normal((3, 7, 32), dtype=np.float32))
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 5:] = True
    got, _ = mha(x, key_padding_mask=pad)
    with torch.no_grad():
        want, _ = torch_mha(x, x, x, key_padding_mask=pad, need_weights=False)
    assert isinstance(got, np.ndarray)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)
    same, _ = mha(x.numpy(), key_padding_mask=pad.numpy())
    np.testing.assert_array_equal(got, same)


def test_refused_tensors_say_how_to_convert():
    torch = pytest.importorskip("torch")
    needs_grad = torch.ones(2, 3, 4, requires_grad=True)
    with pytest.raises(TypeError, match=r"query: .*t\.numpy\(\)"):
        cattn.scaled_dot_product_attention(needs_grad, needs_grad.detach(),
                                           needs_grad.detach())
    bf16 = torch.ones(2, 3, 4, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"key: .*t\.numpy\(\)"):
        cattn.scaled_dot_product_attention(torch.ones(2, 3, 4).numpy(), bf16, bf16)
    mha = cattn.MultiHeadAttention(4, 2)
    with pytest.raises(TypeError, match=r"query: .*t\.numpy\(\)"):
        mha(needs_grad)
