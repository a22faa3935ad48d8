"""The source side: client library, replication, capture and the ``blockrepl`` command."""
