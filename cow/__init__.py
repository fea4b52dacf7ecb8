"""cow: a copy-on-write block engine (Cython) served over NBD, compatible with nbdkit's cow filter.

The engine (`cow.engine.Engine`) overlays a read-only backing (a file, a block device or an NBD
export) with a sparse temporary file; `cow.server` serves it over NBD and `cow.nbdkit_plugin` serves
it from inside nbdkit.
"""

__version__ = "0.1.0"
