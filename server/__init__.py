"""exlsp LSP adapter: thin handlers over the completion engine and the index."""
