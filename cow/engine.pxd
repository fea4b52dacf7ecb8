# C declarations for the copy-on-write engine: pthread, libnbd, file I/O, the state enum.
# No logic here (see engine.pyx).

from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t
from posix.types cimport off_t


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *m, const void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_trylock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)


cdef extern from "<fcntl.h>" nogil:
    int O_RDONLY, O_RDWR, O_CLOEXEC, O_TMPFILE, O_EXCL
    int fallocate(int fd, int mode, off_t offset, off_t len)
    int FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
    int posix_fadvise(int fd, off_t offset, off_t len, int advice)
    int POSIX_FADV_WILLNEED


cdef extern from "<unistd.h>" nogil:
    ssize_t pread(int fd, void *buf, size_t count, off_t offset)
    ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset)
    off_t lseek(int fd, off_t offset, int whence)
    int close(int fd)
    int fdatasync(int fd)
    int ftruncate(int fd, off_t length)
    int access(const char *path, int mode)
    int F_OK
    int SEEK_SET, SEEK_END, SEEK_DATA, SEEK_HOLE


cdef extern from "<sys/stat.h>" nogil:
    cdef struct struct_stat "stat":
        off_t st_size
        long st_blocks
        unsigned int st_mode
    int fstat(int fd, struct_stat *st)
    bint S_ISBLK(unsigned int mode)
    bint S_ISREG(unsigned int mode)


cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)


cdef extern from "<linux/fs.h>" nogil:
    unsigned long BLKGETSIZE64


cdef extern from "<libnbd.h>" nogil:
    struct nbd_handle:
        pass
    ctypedef int (*nbd_extent_fn)(void *user_data, const char *metacontext, uint64_t offset,
                                  uint32_t *entries, size_t nr_entries, int *error) noexcept nogil
    ctypedef struct nbd_extent_callback:
        nbd_extent_fn callback
        void *user_data
        void (*free)(void *user_data) noexcept nogil
    nbd_handle *nbd_create()
    void nbd_close(nbd_handle *h)
    const char *nbd_get_error()
    int nbd_get_errno()
    int nbd_add_meta_context(nbd_handle *h, const char *name)
    int nbd_connect_uri(nbd_handle *h, const char *uri)
    int nbd_set_handle_name(nbd_handle *h, const char *name)
    int64_t nbd_get_size(nbd_handle *h)
    int64_t nbd_get_block_size(nbd_handle *h, int size_type)
    int nbd_can_meta_context(nbd_handle *h, const char *name)
    int nbd_can_cache(nbd_handle *h)
    int nbd_can_multi_conn(nbd_handle *h)
    int nbd_pread(nbd_handle *h, void *buf, size_t count, uint64_t offset, uint32_t flags)
    int nbd_cache(nbd_handle *h, uint64_t count, uint64_t offset, uint32_t flags)
    int nbd_block_status(nbd_handle *h, uint64_t count, uint64_t offset,
                         nbd_extent_callback cb, uint32_t flags)
    int nbd_shutdown(nbd_handle *h, uint32_t flags)
    uint32_t LIBNBD_CMD_FLAG_REQ_ONE
    int LIBNBD_SIZE_MAXIMUM
    int LIBNBD_SIZE_MINIMUM
    const char *LIBNBD_CONTEXT_BASE_ALLOCATION


cdef enum bm_entry:
    BLOCK_NOT_ALLOCATED = 0
    BLOCK_ALLOCATED = 1
    BLOCK_TRIMMED = 3


# A growing list of (length, type) runs built without the GIL.
cdef struct runs_t:
    uint64_t *length
    uint32_t *kind
    size_t n
    size_t cap
    size_t limit        # stop adding new runs past this many
    bint req_one


# The read-only backing: a file descriptor or a set of libnbd handles.
cdef struct backing_t:
    int fd
    nbd_handle **handles
    pthread_mutex_t *handle_locks
    int nr_handles
    unsigned int next_handle
    uint64_t size
    uint64_t max_request
    uint64_t min_block       # NBD: requests must be aligned to this (1: no constraint)
    bint base_allocation
    bint can_cache


cdef extern from "<errno.h>" nogil:
    int ENOTSUP
