"""Front ends: thin codecs over the engine (gRPC, KServe V2 REST) and their launchers."""
