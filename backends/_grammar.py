"""The core's grammar masks (:class:`gateway.output.matchers.Constraint`) as numpy arrays, for
the backends that apply them to logits."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def words(mask: bytearray) -> npt.NDArray[np.int32]:
    """The packed mask as int32 words, sharing its memory (what ExLlamaV3 takes)."""
    return np.frombuffer(mask, dtype=np.int32)


def unpack(mask: bytearray, n: int) -> npt.NDArray[np.bool_]:
    """The first ``n`` tokens' bits as booleans (True: allowed); tokens past the mask are not."""
    bits = np.unpackbits(np.frombuffer(mask, dtype=np.uint8), bitorder="little").view(bool)
    if bits.shape[0] >= n:
        return bits[:n]
    return np.concatenate([bits, np.zeros(n - bits.shape[0], dtype=bool)])
