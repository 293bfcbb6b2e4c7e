"""dsv3lib: the library behind the dsv3-book chapters (a DeepSeek-V3 you can read, train and test).

The entry points most readers start from are re-exported here; each lives in its own module.
"""

from .accounting import kv_cache_bytes_per_token, param_counts
from .checkpoint import load, save
from .config import ModelConfig
from .hf import load_hf
from .model import Transformer

__all__ = ["ModelConfig", "Transformer", "param_counts", "kv_cache_bytes_per_token", "load", "load_hf", "save"]
__version__ = "0.1.0"
