"""The process server: ingest on 9443, durable cache, shipping to the master target."""
