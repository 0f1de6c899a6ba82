"""A `--data` factory returning NumPy arrays gets the same one-line message as the Python API (nothing converted)."""

import numpy as np
import pytest

from gradlab.datasets import _as_split
from gradlab.errors import UsageError


def test_numpy_tuple_from_a_factory_is_refused_with_the_api_s_message():
    with pytest.raises(UsageError) as exc:
        _as_split((np.zeros((3, 2), np.float32), np.zeros(3, np.int64)), "mydata:cls")
    msg = str(exc.value)
    assert "holds NumPy arrays" in msg and "torch.from_numpy" in msg and "\n" not in msg
