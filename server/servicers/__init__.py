"""gRPC servicers: thin adapters from messages to plain functions."""
