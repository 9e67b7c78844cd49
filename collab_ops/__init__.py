"""collab_ops: fused kernels for large/small language-model collaboration."""
from ._availability import available_backends, backend_status, warn_if_degraded
from ._dispatch import BackendUnavailableError

__version__ = "0.1.0"

warn_if_degraded()
