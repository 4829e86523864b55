"""moduleserve client: generated stubs, a friendly client and the `moduleserve` CLI."""
