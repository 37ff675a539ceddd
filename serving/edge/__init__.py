"""The gRPC edge: the servicer, protobuf <-> domain conversion, the server's lifecycle and a
client. The only serving code that touches generated protobuf classes."""
