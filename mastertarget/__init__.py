"""The master target: receive, apply, retention journal, recovery points."""
