"""gigapatch: train neural networks on images too large for memory.

Training memory is set by the patch, not by the image.
"""

from gigapatch.core.errors import ConfigError, DataError, GigapatchError

__version__ = "0.1.0"

__all__ = ["ConfigError", "DataError", "GigapatchError", "__version__"]
