"""Checkpoints that torch >= 2.6 loads with ``weights_only=True``, as mmengine 0.10.7 asks it to.

torch >= 2.6 defaults to ``torch.load(weights_only=True)`` and mmengine 0.10.7 calls
``torch.load`` without the argument, so testing or resuming from a checkpoint that mmengine
saved fails: besides tensors, it holds the MessageHub's ``HistoryBuffer`` objects (numpy
arrays inside) and numpy scalars.
Worse, ``HistoryBuffer.__getstate__`` pickles its statistics *functions*, which unpickling
rebuilds through ``getattr``: allowlisting ``getattr`` would let a crafted file reach any
function (``getattr`` of a module's globals, and so on), i.e. run arbitrary code.

Choice: :func:`setup_checkpoint_serialization`, which ``import dk_mmdet`` calls, does two things.

- Writing: it registers a ``copyreg`` reducer that pickles a ``HistoryBuffer`` as the call
  ``HistoryBuffer(log_history, count_history, max_length)``: data only, no functions. The
  statistics methods are class-level in mmengine and come back with the class.
- Reading: it allowlists (``torch.serialization.add_safe_globals``) the classes these
  checkpoints contain beyond torch's defaults: ``HistoryBuffer`` and what numpy arrays and
  scalars of numbers need. None of them can call anything else, so an untrusted file still
  cannot run code.

Rejected: ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` or ``weights_only=False`` in mmengine, which
would make loading any checkpoint, downloaded ones included, able to run arbitrary code.
Checkpoints written by a stock mmengine (with the functions inside) still fail to load;
if you trust such a file, set ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` for that one run.
"""
import copyreg

import numpy as np
import torch
from mmengine.logging import HistoryBuffer

# numpy 2 moved numpy.core to numpy._core
_multiarray = np._core.multiarray if hasattr(np, '_core') else np.core.multiarray

CHECKPOINT_SAFE_GLOBALS = [
    HistoryBuffer,
    np.ndarray,
    np.dtype,
    _multiarray._reconstruct,
    _multiarray.scalar,
    # numpy 2 builds each dtype as an instance of its own class: the number types only
    np.dtypes.Float64DType,
    np.dtypes.Float32DType,
    np.dtypes.Int64DType,
    np.dtypes.Int32DType,
    np.dtypes.BoolDType,
]


def _reduce_history_buffer(buffer: HistoryBuffer):
    log_history, count_history = buffer.data
    return HistoryBuffer, (log_history, count_history, buffer.max_length)


def setup_checkpoint_serialization() -> None:
    """Save HistoryBuffers as data, and let ``weights_only`` loading read mmengine checkpoints."""
    copyreg.pickle(HistoryBuffer, _reduce_history_buffer)
    torch.serialization.add_safe_globals(CHECKPOINT_SAFE_GLOBALS)
