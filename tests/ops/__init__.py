"""A package, so that its test modules get package names (ops.triton.test_indexer) that cannot clash with another
folder's test file of the same name (tests/model/test_indexer.py), and tests/ops is not put on sys.path (where,
on a machine without Triton, the folder tests/ops/triton would pass for the `triton` package)."""
