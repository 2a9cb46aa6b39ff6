"""Plain-PyTorch specification of every op in dsv4.ops: fp32 inside, readable, never optimised."""
