"""A GGUF the native engine cannot run fails to load with a clear, catchable reason."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from capibara6.engine.dequant import SUPPORTED, dequantize
from capibara6.engine.errors import UnsupportedModel


def test_unsupported_tensor_type_is_a_load_error() -> None:
    qtype = next(q for q in QT if q not in SUPPORTED)
    with pytest.raises(UnsupportedModel, match=qtype.name):
        dequantize(np.zeros(64, np.uint8), qtype)
    assert issubclass(UnsupportedModel, ValueError)  # the pool reports it as 503 model_unavailable
