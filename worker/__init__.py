"""The worker: training, evaluation and inference processes (torch and its libraries live here only)."""

import logging as _logging


class _DropMissingKernelsNotice(_logging.Filter):
    """bitsandbytes 0.50 logs a warning at import on CPUs with AVX512-BF16 when the optional `kernels`
    package (a Hub kernel download) is absent. Tuneforge never downloads kernels; the 4-bit layers fall
    back to bitsandbytes' own CPU code, so the line only alarms the reader of every job's log."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


# The logger exists before bitsandbytes is imported, so the filter is in place when it logs.
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropMissingKernelsNotice())
