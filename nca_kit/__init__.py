"""nca-kit: Noise Contrastive Alignment (InfoNCA / NCA) of language models, as a course and a reproduction kit."""

import logging as _logging


class _DropOptionalCpuKernelNotice(_logging.Filter):
    """Drop bitsandbytes' notice that its optional CPU 4-bit kernel could not be fetched from the hub.

    bitsandbytes logs it at import (``peft`` imports bitsandbytes) on CPUs with AVX512-BF16 when the ``kernels``
    package or the hub is missing. bitsandbytes' own CPU path runs 4-bit models without that kernel, so the notice is
    noise on every CLI call; every other bitsandbytes message passes.
    """

    def filter(self, record: _logging.LogRecord) -> bool:
        return "gemm_4bit_forward from kernels-community" not in str(record.msg)


_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropOptionalCpuKernelNotice())

__all__ = ["reward_loss", "preference_loss", "soft_labels"]
__version__ = "0.1.0"


def __getattr__(name):
    # The losses load on first use, so that ``import nca_kit.<module>`` costs only what that module imports (the
    # command line's --help and config errors answer without importing torch).
    if name in __all__:
        from nca_kit import losses

        return getattr(losses, name)
    raise AttributeError(f"module 'nca_kit' has no attribute {name!r}")
