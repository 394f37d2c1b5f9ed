"""Prefect Block types of jobbridge: ``prefect block register -m jobbridge.blocks`` registers them.

Only block classes of jobbridge's own are imported here by name: the register command registers every
Block class it finds in this module's namespace, and prefect-aws's or Prefect's blocks are theirs to
register (they are registered anyway as the nested types of ours).
"""

from jobbridge.blocks.mirror import (
    DynamoDBMirror,
    MirrorBlock,
    MirrorConfigError,
    MongoDBMirror,
    build_targets,
    load_mirror_blocks,
    mirror_blocks_from_settings,
    mirror_targets,
)

__all__ = [
    "DynamoDBMirror",
    "MirrorBlock",
    "MirrorConfigError",
    "MongoDBMirror",
    "build_targets",
    "load_mirror_blocks",
    "mirror_blocks_from_settings",
    "mirror_targets",
]
