"""seqserve.client."""
