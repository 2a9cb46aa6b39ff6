"""Serving: an engine that batches many requests' decoding continuously over a fixed pool of cache rows."""
