"""seqserve.server."""
