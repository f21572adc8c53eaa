"""refute: verification of machine-learning inference run on untrusted hardware.

The core library (this package) turns an ONNX model and an input into segments, states and a
trace commitment exactly as ``DESIGN.md`` defines them. The service, prover and dispute game
live in the sibling packages ``verifier``, ``prover``, ``challenge`` and ``circuits``.
"""

from refute.safejson import import_py_ecc_safely

import_py_ecc_safely()  # before anything imports eth-account: keeps the recursion limit

from refute.commitment import TraceCommitment  # noqa: E402
from refute.errors import RefuteError  # noqa: E402
from refute.executor import DeterministicExecutor  # noqa: E402
from refute.loading import LoadedModel, LoadLimits, TensorSpec, load_model  # noqa: E402
from refute.manifest import Manifest  # noqa: E402
from refute.provider import PreparedModel, prepare_model, read_inputs_json, run_trace  # noqa: E402
from refute.segmentation import Segment, Segmentation, segment_model  # noqa: E402
from refute.trace import Trace  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "DeterministicExecutor",
    "LoadLimits",
    "LoadedModel",
    "Manifest",
    "PreparedModel",
    "RefuteError",
    "Segment",
    "Segmentation",
    "TensorSpec",
    "Trace",
    "TraceCommitment",
    "__version__",
    "load_model",
    "prepare_model",
    "read_inputs_json",
    "run_trace",
    "segment_model",
]
