"""Dataset sources: every dataset as uint8 RGB images, int64 labels and a fingerprint.

``load_split("digits", "test")`` and the like return a ``DatasetSplit``; ``list_datasets()``
describes the built-in datasets and the reference forms. Importing this package never imports
torch, scikit-learn or the Hugging Face ``datasets`` library (the last is imported when a
Hugging Face split is read), so the API process can fingerprint datasets cheaply.
"""

from workers.datasets.images import to_rgb_uint8
from workers.datasets.loader import canonical_reference, clear_cache, list_datasets, load_split
from workers.datasets.split import DatasetSplit
from workers.errors import DatasetError, PathNotAllowedError

__all__ = [
    "DatasetError",
    "DatasetSplit",
    "PathNotAllowedError",
    "canonical_reference",
    "clear_cache",
    "list_datasets",
    "load_split",
    "to_rgb_uint8",
]
