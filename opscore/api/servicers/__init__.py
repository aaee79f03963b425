"""gRPC servicers: they only translate (through `convert/`) and call the domain."""
