"""Live write capture (``blockrepl agent capture``): nbdkit and its plugin on one side
(plugin/), the disk's stream, its resyncs and its control socket on the other."""
