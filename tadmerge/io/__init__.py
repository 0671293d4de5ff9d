"""I/O layer: strict safetensors headers, safe checkpoint opening, block I/O, publish.

See README.md in this folder for the guarantees (what is validated and the
staging / manifest / publish protocol).
"""

from tadmerge.io.block_io import (
    OutputTensor,
    ShardSpec,
    close_all,
    create_shard_files,
    index_json,
    layout_shards,
    read_rows,
    sync_all,
    write_at,
)
from tadmerge.io.checkpoint import Checkpoint, open_checkpoint
from tadmerge.io.publish import (
    Staging,
    check_output_outside_inputs,
    verify_output,
    write_manifest,
)
from tadmerge.io.safetensors_format import (
    DTYPE_SIZE,
    FLOAT_DTYPES,
    SafetensorsHeader,
    TensorEntry,
    dtype_name,
    read_header,
    torch_dtype,
)

__all__ = [
    "DTYPE_SIZE",
    "FLOAT_DTYPES",
    "Checkpoint",
    "OutputTensor",
    "SafetensorsHeader",
    "ShardSpec",
    "Staging",
    "TensorEntry",
    "check_output_outside_inputs",
    "close_all",
    "create_shard_files",
    "dtype_name",
    "index_json",
    "layout_shards",
    "open_checkpoint",
    "read_header",
    "torch_dtype",
    "read_rows",
    "sync_all",
    "verify_output",
    "write_at",
    "write_manifest",
]
