"""The moduleserve gRPC server."""
