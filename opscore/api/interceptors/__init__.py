"""The server's interceptor chain, one concern each (see `chain.py`)."""
