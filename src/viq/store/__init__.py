"""The code store: codes of millions of images in append-only shards, written once by extraction and
read many times by training."""
