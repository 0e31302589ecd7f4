"""The synthetic-set HDF5 format (h5file), export, import of other tools' sets, the grid picture
(atomic writes: ddtool.files).

Layout of the file: docs/synthetic-set-format.md.
"""

from ddtool.files import atomic_directory, atomic_path
from ddtool.storage.export import EXPORT_FORMATS, class_folder_names, export_set
from ddtool.storage.h5file import (
    FORMAT_MARKER,
    SCHEMA_VERSION,
    append_evaluation,
    load_synthetic_set,
    save_synthetic_set,
)
from ddtool.storage.importers import IMPORT_FORMATS, import_set
from ddtool.storage.picture import save_grid_png
from ddtool.storage.synthetic_set import (
    EVALUATION_REQUIRED_KEYS,
    LABEL_KINDS,
    UNKNOWN_SEED,
    SyntheticSet,
    normalize_evaluation,
)

__all__ = [
    "EVALUATION_REQUIRED_KEYS",
    "EXPORT_FORMATS",
    "FORMAT_MARKER",
    "IMPORT_FORMATS",
    "LABEL_KINDS",
    "SCHEMA_VERSION",
    "UNKNOWN_SEED",
    "SyntheticSet",
    "append_evaluation",
    "atomic_directory",
    "atomic_path",
    "class_folder_names",
    "export_set",
    "import_set",
    "load_synthetic_set",
    "normalize_evaluation",
    "save_grid_png",
    "save_synthetic_set",
]
