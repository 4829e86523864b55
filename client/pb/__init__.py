"""Generated protobuf and gRPC modules (make proto); nothing hand-written."""
