/* Records the file-system operations a process makes below one folder.
 *
 * Loaded with LD_PRELOAD by tests/harness/powercut.py. Every call that changes
 * what a power cut could leave behind (writes, truncation, fsync, creating,
 * renaming and removing names) on a path under $FSLOG_ROOT is appended to the
 * binary log $FSLOG_FILE, together with the bytes written, and then passed to
 * the real libc function. The replay in powercut.py builds from the log every
 * state of the disk that a crash at any moment could leave.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

enum { OP_OPEN = 1, OP_WRITE, OP_TRUNC, OP_FSYNC, OP_RENAME, OP_UNLINK, OP_MKDIR, OP_CLOSE };

#define MAX_FDS 65536
static char *fd_path[MAX_FDS];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int log_fd = -1;
static char root[PATH_MAX];
static size_t root_len;
static __thread int busy;

static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*real_pread)(int, void *, size_t, off_t);

static void init(void) __attribute__((constructor));
static void init(void) {
    real_write = dlsym(RTLD_NEXT, "write");
    real_pwrite = dlsym(RTLD_NEXT, "pwrite");
    real_pread = dlsym(RTLD_NEXT, "pread");
    const char *r = getenv("FSLOG_ROOT");
    const char *f = getenv("FSLOG_FILE");
    if (!r || !f) return;
    if (!realpath(r, root)) return;
    root_len = strlen(root);
    int (*real_open)(const char *, int, ...) = dlsym(RTLD_NEXT, "open");
    log_fd = real_open(f, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
}

static void put(const void *p, size_t n) {
    const char *c = p;
    while (n) {
        ssize_t w = real_write(log_fd, c, n);
        if (w <= 0) { if (errno == EINTR) continue; return; }
        c += w; n -= (size_t)w;
    }
}

static void record(int op, int fd, int64_t off, int64_t len, const char *a, const char *b,
                   const void *data, int64_t flags) {
    uint8_t o = (uint8_t)op;
    int32_t f = fd;
    uint32_t la = a ? (uint32_t)strlen(a) : 0, lb = b ? (uint32_t)strlen(b) : 0;
    put(&o, 1); put(&f, 4); put(&off, 8); put(&len, 8); put(&flags, 8);
    put(&la, 4); if (la) put(a, la);
    put(&lb, 4); if (lb) put(b, lb);
    if (data && len > 0) put(data, (size_t)len);
}

/* An absolute, normalised path for (dirfd, name); NULL when not under the root. */
static char *resolve(int dirfd, const char *name) {
    char buf[PATH_MAX * 2];
    if (!name) return NULL;
    if (name[0] == '/') {
        snprintf(buf, sizeof buf, "%s", name);
    } else if (dirfd == AT_FDCWD) {
        char cwd[PATH_MAX];
        if (!getcwd(cwd, sizeof cwd)) return NULL;
        snprintf(buf, sizeof buf, "%s/%s", cwd, name);
    } else if (dirfd >= 0 && dirfd < MAX_FDS && fd_path[dirfd]) {
        snprintf(buf, sizeof buf, "%s/%s", fd_path[dirfd], name);
    } else {
        return NULL;
    }
    /* normalise the directory part (the file itself may not exist yet) */
    char *slash = strrchr(buf, '/');
    char dir[PATH_MAX], out[PATH_MAX * 2];
    *slash = 0;
    if (!realpath(buf[0] ? buf : "/", dir)) return NULL;
    snprintf(out, sizeof out, "%s/%s", dir, slash + 1);
    if (strcmp(slash + 1, ".") == 0) snprintf(out, sizeof out, "%s", dir);
    if (strncmp(out, root, root_len) != 0 || (out[root_len] && out[root_len] != '/'))
        return NULL;
    return strdup(out);
}

static int watched(int fd) { return log_fd >= 0 && fd >= 0 && fd < MAX_FDS && fd_path[fd]; }

static int after_open(int fd, int dirfd, const char *name, int flags) {
    if (fd < 0 || log_fd < 0 || busy || fd >= MAX_FDS) return fd;
    busy = 1;
    char *p = resolve(dirfd, name);
    pthread_mutex_lock(&lock);
    free(fd_path[fd]);
    fd_path[fd] = p;
    if (p) record(OP_OPEN, fd, 0, 0, p, NULL, NULL, flags);
    pthread_mutex_unlock(&lock);
    busy = 0;
    return fd;
}

#define OPEN_MODE                              \
    mode_t mode = 0;                           \
    if (flags & (O_CREAT | O_TMPFILE)) {       \
        va_list ap;                            \
        va_start(ap, flags);                   \
        mode = va_arg(ap, mode_t);             \
        va_end(ap);                            \
    }

int open(const char *path, int flags, ...) {
    OPEN_MODE
    int (*f)(const char *, int, ...) = dlsym(RTLD_NEXT, "open");
    return after_open(f(path, flags, mode), AT_FDCWD, path, flags);
}
int open64(const char *path, int flags, ...) {
    OPEN_MODE
    int (*f)(const char *, int, ...) = dlsym(RTLD_NEXT, "open64");
    return after_open(f(path, flags, mode), AT_FDCWD, path, flags);
}
int openat(int dirfd, const char *path, int flags, ...) {
    OPEN_MODE
    int (*f)(int, const char *, int, ...) = dlsym(RTLD_NEXT, "openat");
    return after_open(f(dirfd, path, flags, mode), dirfd, path, flags);
}
int openat64(int dirfd, const char *path, int flags, ...) {
    OPEN_MODE
    int (*f)(int, const char *, int, ...) = dlsym(RTLD_NEXT, "openat64");
    return after_open(f(dirfd, path, flags, mode), dirfd, path, flags);
}

static void logged_write(int fd, int64_t off, const void *data, ssize_t n) {
    if (n <= 0 || !watched(fd) || busy) return;
    pthread_mutex_lock(&lock);
    record(OP_WRITE, fd, off, n, NULL, NULL, data, 0);
    pthread_mutex_unlock(&lock);
}

ssize_t write(int fd, const void *buf, size_t n) {
    int64_t off = watched(fd) && !busy ? lseek(fd, 0, SEEK_CUR) : -1;
    ssize_t r = real_write(fd, buf, n);
    logged_write(fd, off, buf, r);
    return r;
}
ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) {
    ssize_t r = real_pwrite(fd, buf, n, off);
    logged_write(fd, off, buf, r);
    return r;
}
ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off) { return pwrite(fd, buf, n, off); }
ssize_t writev(int fd, const struct iovec *iov, int cnt) {
    int64_t off = watched(fd) && !busy ? lseek(fd, 0, SEEK_CUR) : -1;
    ssize_t (*f)(int, const struct iovec *, int) = dlsym(RTLD_NEXT, "writev");
    ssize_t r = f(fd, iov, cnt);
    ssize_t left = r;
    for (int i = 0; i < cnt && left > 0; i++) {
        ssize_t part = (ssize_t)iov[i].iov_len < left ? (ssize_t)iov[i].iov_len : left;
        logged_write(fd, off, iov[i].iov_base, part);
        off += part;
        left -= part;
    }
    return r;
}

ssize_t copy_file_range(int in, off_t *in_off, int out, off_t *out_off, size_t n,
                        unsigned int flags) {
    ssize_t (*f)(int, off_t *, int, off_t *, size_t, unsigned int) =
        dlsym(RTLD_NEXT, "copy_file_range");
    off_t src = in_off ? *in_off : lseek(in, 0, SEEK_CUR);
    off_t dst = out_off ? *out_off : lseek(out, 0, SEEK_CUR);
    ssize_t r = f(in, in_off, out, out_off, n, flags);
    if (r > 0 && watched(out) && !busy) {
        char *data = malloc((size_t)r);
        if (data && real_pread(in, data, (size_t)r, src) == r) logged_write(out, dst, data, r);
        free(data);
    }
    return r;
}

static int simple(int op, int fd, int64_t len, int r) {
    if (r == 0 && watched(fd) && !busy) {
        pthread_mutex_lock(&lock);
        record(op, fd, 0, len, NULL, NULL, NULL, 0);
        pthread_mutex_unlock(&lock);
    }
    return r;
}
int ftruncate(int fd, off_t len) {
    int (*f)(int, off_t) = dlsym(RTLD_NEXT, "ftruncate");
    return simple(OP_TRUNC, fd, len, f(fd, len));
}
int ftruncate64(int fd, off_t len) { return ftruncate(fd, len); }
int fsync(int fd) {
    int (*f)(int) = dlsym(RTLD_NEXT, "fsync");
    return simple(OP_FSYNC, fd, 0, f(fd));
}
int fdatasync(int fd) {
    int (*f)(int) = dlsym(RTLD_NEXT, "fdatasync");
    return simple(OP_FSYNC, fd, 0, f(fd));
}
int close(int fd) {
    int (*f)(int) = dlsym(RTLD_NEXT, "close");
    if (watched(fd) && !busy) {
        pthread_mutex_lock(&lock);
        record(OP_CLOSE, fd, 0, 0, NULL, NULL, NULL, 0);
        free(fd_path[fd]);
        fd_path[fd] = NULL;
        pthread_mutex_unlock(&lock);
    }
    return f(fd);
}

static int names(int op, int da, const char *a, int db, const char *b, int64_t flags, int r) {
    if (r != 0 || log_fd < 0 || busy) return r;
    busy = 1;
    char *pa = resolve(da, a), *pb = b ? resolve(db, b) : NULL;
    if (pa || pb) {
        pthread_mutex_lock(&lock);
        record(op, -1, 0, 0, pa ? pa : "", pb, NULL, flags);
        pthread_mutex_unlock(&lock);
    }
    free(pa);
    free(pb);
    busy = 0;
    return r;
}
int rename(const char *a, const char *b) {
    /* resolve before: afterwards the old name no longer exists */
    int (*f)(const char *, const char *) = dlsym(RTLD_NEXT, "rename");
    return names(OP_RENAME, AT_FDCWD, a, AT_FDCWD, b, 0, f(a, b));
}
int renameat(int da, const char *a, int db, const char *b) {
    int (*f)(int, const char *, int, const char *) = dlsym(RTLD_NEXT, "renameat");
    return names(OP_RENAME, da, a, db, b, 0, f(da, a, db, b));
}
int renameat2(int da, const char *a, int db, const char *b, unsigned int flags) {
    int (*f)(int, const char *, int, const char *, unsigned int) =
        dlsym(RTLD_NEXT, "renameat2");
    return names(OP_RENAME, da, a, db, b, flags, f(da, a, db, b, flags));
}
int unlink(const char *a) {
    int (*f)(const char *) = dlsym(RTLD_NEXT, "unlink");
    return names(OP_UNLINK, AT_FDCWD, a, 0, NULL, 0, f(a));
}
int unlinkat(int da, const char *a, int flags) {
    int (*f)(int, const char *, int) = dlsym(RTLD_NEXT, "unlinkat");
    return names(OP_UNLINK, da, a, 0, NULL, flags, f(da, a, flags));
}
int mkdir(const char *a, mode_t m) {
    int (*f)(const char *, mode_t) = dlsym(RTLD_NEXT, "mkdir");
    return names(OP_MKDIR, AT_FDCWD, a, 0, NULL, 0, f(a, m));
}
int mkdirat(int da, const char *a, mode_t m) {
    int (*f)(int, const char *, mode_t) = dlsym(RTLD_NEXT, "mkdirat");
    return names(OP_MKDIR, da, a, 0, NULL, 0, f(da, a, m));
}
