"""The nbdkit plugin and what it shares with the agent: the capture socket's frames
(wire.py) and the dirty map (dirtymap.py). Standard library only: nbdkit runs the
plugin in Debian's own Python, and loads these modules beside it by name."""
