"""tadmerge: exact, out-of-core, distributed merging of fine-tuned checkpoints."""

__version__ = "0.1.0"
