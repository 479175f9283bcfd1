"""seqserve.models."""
