"""Types every stage shares: schema, candidates, request context, bundle, store, settings."""
