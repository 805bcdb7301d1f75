"""The canonical image dataset: single-image codecs, Parquet inspection/validation/reading, and preparation."""

from memshard.data.dataset import (
    ChunkReport,
    DataError,
    DatasetInfo,
    duplicate_ids,
    inspect_dataset,
    load_captions,
    load_columns,
    load_rows,
    row_chunks,
    validate_chunk,
)
from memshard.data.images import BadImage, decode_image, encode_png
from memshard.data.prepare import BUILTIN_SOURCES, PrepareResult, prepare

__all__ = [
    "BUILTIN_SOURCES",
    "BadImage",
    "ChunkReport",
    "DataError",
    "DatasetInfo",
    "PrepareResult",
    "decode_image",
    "duplicate_ids",
    "encode_png",
    "inspect_dataset",
    "load_captions",
    "load_columns",
    "load_rows",
    "prepare",
    "row_chunks",
    "validate_chunk",
]
