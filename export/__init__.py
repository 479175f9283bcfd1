"""seqserve.export."""
