"""An nbdkit python plugin whose callbacks do nothing: the ceiling of any python plugin.

    nbdkit python bench/null_plugin.py file=BACKING

It advertises what cow/nbdkit_plugin.py advertises, with the same thread model and callback
signatures, so nbdkit does the same work around each call (take the GIL, wrap the buffer, call,
check the result); then reads leave nbdkit's buffer as it is and writes are dropped.  The backing
only gives the size.  bench/ measures it beside the shim as the target `python-null`.
"""

import os

import nbdkit

API_VERSION = 2

_size = None


def config(key, value):
    global _size
    if key != "file":
        raise ValueError(f"unknown parameter {key}={value} (only file=)")
    fd = os.open(value, os.O_RDONLY)  # (open is the plugin's callback here)
    try:
        _size = os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def config_complete():
    if _size is None:
        raise ValueError("file=BACKING is required")


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def open(readonly):
    return 1


def get_size(h):
    return _size


def block_size(h):
    return (1, 65536, 64 * 1024 * 1024)


def can_write(h):
    return True


def can_flush(h):
    return True


def can_trim(h):
    return True


def can_zero(h):
    return True


def can_fast_zero(h):
    return True


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_cache(h):
    return nbdkit.CACHE_NATIVE


def can_extents(h):
    return True


def can_multi_conn(h):
    return True


def pread(h, buf, offset, flags):
    pass


def pwrite(h, buf, offset, flags):
    pass


def flush(h, flags):
    pass


def trim(h, count, offset, flags):
    pass


def zero(h, count, offset, flags):
    pass


def cache(h, count, offset, flags):
    pass


def extents(h, count, offset, flags):
    return [(offset, count, 0)]
