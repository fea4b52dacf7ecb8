# C declarations shared by the compiled modules: pthread, file I/O, poll, eventfd, libnbd.
# Declarations only; no logic.

from libc.stdint cimport uint32_t, uint64_t, int64_t
from posix.types cimport off_t
from posix.time cimport timespec


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_t:
        pass
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    int pthread_create(pthread_t *thread, const void *attr, void *(*start)(void *) noexcept nogil,
                       void *arg)
    int pthread_join(pthread_t thread, void **retval)
    int pthread_mutex_init(pthread_mutex_t *m, const void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)
    int pthread_mutex_trylock(pthread_mutex_t *m)
    int pthread_cond_init(pthread_cond_t *c, const void *attr)
    int pthread_cond_destroy(pthread_cond_t *c)
    int pthread_cond_wait(pthread_cond_t *c, pthread_mutex_t *m)
    int pthread_cond_timedwait(pthread_cond_t *c, pthread_mutex_t *m, const timespec *abstime)
    int pthread_cond_signal(pthread_cond_t *c)
    int pthread_cond_broadcast(pthread_cond_t *c)


cdef extern from *:
    """
    static inline int cow_atomic_load(int *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void cow_atomic_store(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline int cow_atomic_add(int *p, int v) {
        return __atomic_add_fetch(p, v, __ATOMIC_ACQ_REL);
    }
    static inline int cow_atomic_cas(int *p, int expected, int desired) {
        return __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_ACQ_REL,
                                           __ATOMIC_ACQUIRE);
    }
    """
    int cow_atomic_load(int *p) noexcept nogil
    void cow_atomic_store(int *p, int v) noexcept nogil
    int cow_atomic_add(int *p, int v) noexcept nogil
    int cow_atomic_cas(int *p, int expected, int desired) noexcept nogil


cdef extern from "<fcntl.h>" nogil:
    int O_RDONLY, O_RDWR, O_CLOEXEC, O_TMPFILE, O_EXCL
    int fcntl(int fd, int cmd, ...)
    int F_SETPIPE_SZ, F_DUPFD_CLOEXEC
    ssize_t splice(int fd_in, off_t *off_in, int fd_out, off_t *off_out, size_t len,
                   unsigned int flags)
    unsigned int SPLICE_F_MOVE, SPLICE_F_NONBLOCK
    int fallocate(int fd, int mode, off_t offset, off_t len)
    int FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
    int posix_fadvise(int fd, off_t offset, off_t len, int advice)
    int POSIX_FADV_WILLNEED


cdef extern from "<unistd.h>" nogil:
    ssize_t pread(int fd, void *buf, size_t count, off_t offset)
    ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset)
    ssize_t read(int fd, void *buf, size_t count)
    int pipe2(int fds[2], int flags)
    ssize_t write(int fd, const void *buf, size_t count)
    off_t lseek(int fd, off_t offset, int whence)
    int close(int fd)
    int fdatasync(int fd)
    int ftruncate(int fd, off_t length)
    int access(const char *path, int mode)
    int getpid()
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


cdef extern from "<poll.h>" nogil:
    cdef struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    short POLLIN, POLLOUT, POLLERR, POLLHUP, POLLNVAL


cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    int EFD_CLOEXEC, EFD_NONBLOCK


cdef extern from "<sys/uio.h>" nogil:
    cdef struct iovec:
        void *iov_base
        size_t iov_len


cdef extern from "<sys/socket.h>" nogil:
    cdef struct msghdr:
        void *msg_name
        unsigned int msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    ssize_t sendmsg(int fd, const msghdr *msg, int flags)
    ssize_t recv(int fd, void *buf, size_t len, int flags)
    int shutdown(int fd, int how)
    int MSG_MORE, MSG_NOSIGNAL, MSG_DONTWAIT, MSG_PEEK, SHUT_RDWR


cdef extern from "<sys/sendfile.h>" nogil:
    ssize_t sendfile(int out_fd, int in_fd, off_t *offset, size_t count)


cdef extern from "<stdio.h>" nogil:
    ctypedef struct FILE:
        pass
    FILE *stderr
    int fprintf(FILE *stream, const char *fmt, ...)
    int snprintf(char *buf, size_t size, const char *fmt, ...)


cdef extern from "<errno.h>" nogil:
    int ENOTSUP, EBUSY


cdef extern from "<libnbd.h>" nogil:
    struct nbd_handle:
        pass
    ctypedef struct nbd_completion_callback:
        int (*callback)(void *user_data, int *error) noexcept nogil
        void *user_data
        void (*free)(void *user_data) noexcept nogil
    ctypedef struct nbd_extent_callback:
        int (*callback)(void *user_data, const char *metacontext, uint64_t offset,
                        uint32_t *entries, size_t nr_entries, int *error) noexcept nogil
        void *user_data
        void (*free)(void *user_data) noexcept nogil
    nbd_handle *nbd_create()
    void nbd_close(nbd_handle *h)
    const char *nbd_get_error()
    int nbd_get_errno()
    int nbd_set_handle_name(nbd_handle *h, const char *name)
    int nbd_set_pread_initialize(nbd_handle *h, bint request)
    int nbd_add_meta_context(nbd_handle *h, const char *name)
    int nbd_connect_uri(nbd_handle *h, const char *uri)
    int nbd_aio_connect_socket(nbd_handle *h, int sock)
    int nbd_aio_connect_uri(nbd_handle *h, const char *uri)
    int nbd_aio_connect_unix(nbd_handle *h, const char *unixsocket)
    int64_t nbd_get_size(nbd_handle *h)
    int64_t nbd_get_block_size(nbd_handle *h, int size_type)
    int nbd_can_meta_context(nbd_handle *h, const char *name)
    int nbd_can_cache(nbd_handle *h)
    int nbd_can_multi_conn(nbd_handle *h)
    int64_t nbd_aio_pread(nbd_handle *h, void *buf, size_t count, uint64_t offset,
                          nbd_completion_callback completion, uint32_t flags)
    int64_t nbd_aio_cache(nbd_handle *h, uint64_t count, uint64_t offset,
                          nbd_completion_callback completion, uint32_t flags)
    int64_t nbd_aio_block_status(nbd_handle *h, uint64_t count, uint64_t offset,
                                 nbd_extent_callback extent, nbd_completion_callback completion,
                                 uint32_t flags)
    int nbd_aio_disconnect(nbd_handle *h, uint32_t flags)
    int nbd_aio_get_fd(nbd_handle *h)
    unsigned nbd_aio_get_direction(nbd_handle *h)
    int nbd_aio_notify_read(nbd_handle *h)
    int nbd_aio_notify_write(nbd_handle *h)
    int nbd_aio_is_dead(nbd_handle *h)
    int nbd_aio_is_closed(nbd_handle *h)
    int nbd_aio_is_connecting(nbd_handle *h)
    int nbd_aio_is_ready(nbd_handle *h)
    unsigned LIBNBD_AIO_DIRECTION_READ, LIBNBD_AIO_DIRECTION_WRITE
    uint32_t LIBNBD_CMD_FLAG_REQ_ONE
    int LIBNBD_SIZE_MAXIMUM
    int LIBNBD_SIZE_MINIMUM
