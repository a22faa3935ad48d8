# The ``nbdkit`` module that nbdkit's Python plugin provides to a plugin
# (nbdkit-python-plugin(3)): what agent/capture/plugin/nbdkit_plugin.py uses.

THREAD_MODEL_SERIALIZE_CONNECTIONS: int
THREAD_MODEL_SERIALIZE_ALL_REQUESTS: int
THREAD_MODEL_SERIALIZE_REQUESTS: int
THREAD_MODEL_PARALLEL: int
FLAG_MAY_TRIM: int
FLAG_FUA: int
FLAG_REQ_ONE: int
FLAG_FAST_ZERO: int
FUA_NONE: int
FUA_EMULATE: int
FUA_NATIVE: int
CACHE_NONE: int
CACHE_EMULATE: int
CACHE_NATIVE: int
EXTENT_HOLE: int
EXTENT_ZERO: int

def debug(msg: str) -> None: ...
def export_name() -> str: ...
def set_error(err: int) -> None: ...
def parse_size(text: str) -> int: ...
def shutdown() -> None: ...
