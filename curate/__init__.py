"""Formats, shard IO and executors: URL tables, downloads, image shards, buckets, latents."""
