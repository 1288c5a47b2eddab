"""Model backends: one streaming protocol, several implementations."""
