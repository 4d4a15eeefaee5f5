"""A T5 encoder through cattn (examples/t5_encoder.py): the weights of transformers'
T5EncoderModel, built from a random tiny config, run as NumPy layers whose attention is one
cattn call with T5's bias looked up in the kernel; the hidden states match transformers',
and no array of L x S per head is allocated."""
import os
import runpy

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
EXAMPLE = runpy.run_path(os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "examples", "t5_encoder.py"))


@pytest.mark.parametrize("feed_forward", ["relu", "gated-gelu"])
def test_hidden_states_match_transformers(feed_forward, rng):
    # 300 tokens (past T5's max_distance of 128: the log-spaced and clamped buckets), three
    # layers sharing the first one's table, a row padded on the right and one on the left:
    # the bugs this catches are padding ignored, a bias per layer instead of the shared one,
    # the scores scaled by 1/sqrt(d) (T5 does not), the bias's direction flipped (encoder
    # buckets are not symmetric in T5).
    model = EXAMPLE["tiny_t5"](feed_forward)
    encoder = EXAMPLE["T5Encoder"].from_transformers(model)
    input_ids = rng.integers(0, 100, (3, 300))
    attention_mask = np.ones((3, 300), dtype=np.int64)
    attention_mask[1, 211:] = 0
    attention_mask[2, :40] = 0
    ours = encoder(input_ids, attention_mask)
    theirs = EXAMPLE["transformers_hidden_states"](model, input_ids, attention_mask)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_no_array_of_l_by_s_per_head(rng):
    # At L = S = 2048 one head's float32 scores would be 16 MiB, transformers' bias for the
    # 4 heads 64 MiB; the whole encoder (activations, the kernel's scratch) stays below one
    # head's (L, S), so no such array (bias, scores, mask expanded) is ever made.
    encoder = EXAMPLE["T5Encoder"].from_transformers(EXAMPLE["tiny_t5"]())
    L = 2048
    input_ids = rng.integers(0, 100, (1, L))
    attention_mask = np.ones((1, L), dtype=np.int64)
    attention_mask[0, -5:] = 0  # (the padding mask read as (1, 1, 1, S))
    peak = EXAMPLE["peak_bytes"](encoder, input_ids, attention_mask)
    assert peak < L * L * 4 / 2


def test_example_runs(capsys):
    EXAMPLE["main"]()
    text = capsys.readouterr().out
    assert text.count("max abs difference from transformers") == 2
