"""refute: verification of machine-learning inference run on untrusted hardware.

The core library (this package) turns an ONNX model and an input into segments, states and a
trace commitment exactly as ``DESIGN.md`` defines them. The service, prover and dispute game
live in the sibling packages ``verifier``, ``prover``, ``challenge`` and ``circuits``.
"""

from refute.commitment import TraceCommitment
from refute.errors import RefuteError
from refute.executor import DeterministicExecutor
from refute.loading import LoadedModel, LoadLimits, TensorSpec, load_model
from refute.manifest import Manifest
from refute.provider import PreparedModel, prepare_model, read_inputs_json, run_trace
from refute.segmentation import Segment, Segmentation, segment_model
from refute.trace import Trace

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
