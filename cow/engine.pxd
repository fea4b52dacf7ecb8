# C declarations of the engine module: the block states (nbdkit's names).  No logic here.

cdef enum bm_entry:
    BLOCK_NOT_ALLOCATED = 0
    BLOCK_ALLOCATED = 1
    BLOCK_TRIMMED = 3
