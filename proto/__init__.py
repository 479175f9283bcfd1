"""seqserve.proto."""
