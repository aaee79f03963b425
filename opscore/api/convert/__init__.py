"""protobuf <-> domain, one module per service: every request field is checked here
(servicers hold no validation), plus the wire framing of the agent watch."""
