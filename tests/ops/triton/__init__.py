"""The Triton kernels of dsv4.ops (and ops/invariant's) against their references: one file per kernel file."""
