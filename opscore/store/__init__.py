"""Durable state: the Store interface (`base.py`), one package per backend, and the
factory that builds a store from a URL."""
