"""moecluster: an elastic Mixture-of-Experts cluster.

The repository root is this package; `workers/`, `frontend/`, `controller/` ... are its
subpackages. Heavy imports (torch, grpc) happen on first use of an attribute.
"""

__version__ = "0.1.0"
__all__ = ["Client", "ExpertOptimizer", "RemoteMoE", "TrainingSession"]


def __getattr__(name: str):
    if name == "Client":
        from moecluster.sdk.client import Client

        return Client
    if name in ("ExpertOptimizer", "TrainingSession"):
        from moecluster.sdk import training

        return getattr(training, name)
    if name == "RemoteMoE":
        from moecluster.frontend.remote_moe import RemoteMoE

        return RemoteMoE
    raise AttributeError(f"module 'moecluster' has no attribute {name!r}")
