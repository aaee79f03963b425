"""The gRPC edge: servicers that only translate, converters per service, and the
interceptor chain. No SQL, no business rules."""
