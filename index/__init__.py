"""The workspace index (watch -> chunk -> embed -> store -> retrieve)."""
