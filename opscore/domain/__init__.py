"""The domain: one package per concern, plain async Python with no grpc, raising the
OpsCoreError family; each class takes a store, a clock and its own small config."""
