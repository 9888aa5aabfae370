"""PyTorch's deterministic mode for the length of a ``with`` block."""
import contextlib

import pytest
import torch


@contextlib.contextmanager
def deterministic_algorithms(warn_only=False):
    # cuBLAS GEMMs refuse deterministic mode unless their workspace is pinned down.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
        torch.use_deterministic_algorithms(True, warn_only=warn_only)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(False)
