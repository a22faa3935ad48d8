"""What every daemon runs on: config, TLS, crash-safe files, logging, keys and the PKI."""
