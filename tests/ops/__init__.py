"""A package, so that its test modules get package names (ops.triton.test_indexer) that cannot clash with another
folder's test file of the same name (tests/model/test_indexer.py), and no folder here is put on sys.path (where
tests/ops/triton would otherwise stand for the `triton` package)."""
