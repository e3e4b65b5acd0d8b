"""``selfaug_jax/chunking.py``: time-axis chunks and their inverse."""

import jax.numpy as jnp
import numpy as np

from selfaug_jax.chunking import from_chunks, to_chunks


def test_chunks_pad_with_fill_and_invert():
    x = jnp.arange(2 * 7 * 3).reshape(2, 7, 3)
    c = to_chunks(x, 3, fill=-1)
    assert c.shape == (3, 2, 3, 3)
    np.testing.assert_array_equal(c[1, 0], x[0, 3:6])  # chunk 1 of row 0
    np.testing.assert_array_equal(c[2, 1, 1:], -1)  # the two padding positions of the last chunk
    np.testing.assert_array_equal(from_chunks(c, 7), x)


def test_exact_multiple_needs_no_padding():
    x = jnp.ones((1, 8), bool)
    c = to_chunks(x, 4, False)
    assert c.shape == (2, 1, 4) and bool(c.all())
    np.testing.assert_array_equal(from_chunks(c, 8), x)
