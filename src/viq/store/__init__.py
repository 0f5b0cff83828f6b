"""The code store: codes of millions of images in append-only shards, written once by extraction and
read many times by training."""

from viq.store.format import StoreConfig, StoreError
from viq.store.reader import CodeStore
from viq.store.scan import VerifyReport
from viq.store.writer import ShardWriter

__all__ = ["CodeStore", "ShardWriter", "StoreConfig", "StoreError", "VerifyReport"]
