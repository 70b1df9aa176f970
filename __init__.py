"""moecluster: an elastic Mixture-of-Experts cluster.

The repository root is this package; `workers/`, `frontend/`, `controller/` ... are its
subpackages. Heavy imports (torch, grpc) happen on first use of an attribute.
"""

__version__ = "0.1.0"
__all__ = ["Client"]


def __getattr__(name: str):
    if name == "Client":
        from moecluster.sdk.client import Client

        return Client
    raise AttributeError(f"module 'moecluster' has no attribute {name!r}")
