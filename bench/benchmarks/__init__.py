"""The registered benchmarks, one module per op family; importing this package registers them all.

Registration order is run order: the cheap decoding-step ops first, so that a run cut short by
its time budget still covers them.
"""
from . import fusion  # noqa: F401  isort:skip
from . import speculative  # noqa: F401  isort:skip
from . import distill  # noqa: F401  isort:skip
