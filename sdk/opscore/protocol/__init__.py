"""What the server and the SDK share, with no server code: the OpsCoreError family
and its status table, the enums that mirror the protos, every fixed limit and the
rules that check them, and definition-file loading."""
