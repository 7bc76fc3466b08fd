"""The queries, one module per group of tables they touch; :class:`storage.store.Store` holds
one of each."""
