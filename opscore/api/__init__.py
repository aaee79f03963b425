"""gRPC edge: servicers translate protobuf to domain calls; no SQL, no business rules."""
