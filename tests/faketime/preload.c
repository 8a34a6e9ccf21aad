/* Two fixes for running the test suite under libfaketime 0.9.10 (`make test-faketime`
 * preloads this next to libfaketime, with `faketime --exclude-monotonic`).
 *
 * 1. cnd_timedwait: libfaketime fakes clock_gettime/gettimeofday and translates the
 *    absolute deadline of pthread_cond_timedwait from fake to real time, but not that of
 *    C11 cnd_timedwait: glibc implements it with an internal call no preload can catch.
 *    librdkafka (the Kafka client in confluent-kafka) waits with cnd_timedwait on a
 *    deadline read from the faked clock, so at a fake date ahead of the real one every
 *    timed wait lasts until the real clock reaches the fake date: flush(), poll() and
 *    close() hang. Here cnd_timedwait calls pthread_cond_timedwait (libfaketime's, which
 *    converts the deadline); glibc's cnd_t and mtx_t are its pthread types.
 *    (Without --exclude-monotonic, Python's own timed lock waits hang the same way:
 *    sem_clockwait on CLOCK_MONOTONIC, libfaketime issue #390.)
 * 2. clock_nanosleep: with the monotonic clock left real (FAKETIME_DONT_FAKE_MONOTONIC,
 *    so that Python's timed lock waits, which measure on it, work), libfaketime still
 *    shifts an absolute CLOCK_MONOTONIC deadline by the fake offset: the deadline turns
 *    negative and the call fails with EINVAL, which is what Python's time.sleep() uses.
 *    Monotonic sleeps go to the kernel unchanged; the others to libfaketime (libfaketime
 *    issue #426).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <threads.h>
#include <time.h>
#include <unistd.h>

int cnd_timedwait(cnd_t *restrict cond, mtx_t *restrict mutex,
                  const struct timespec *restrict deadline) {
    switch (pthread_cond_timedwait((pthread_cond_t *)cond, (pthread_mutex_t *)mutex,
                                   deadline)) {
    case 0: return thrd_success;
    case ETIMEDOUT: return thrd_timedout;
    case ENOMEM: return thrd_nomem;
    case EBUSY: return thrd_busy;
    default: return thrd_error;
    }
}

typedef int (*clock_nanosleep_fn)(clockid_t, int, const struct timespec *, struct timespec *);

int clock_nanosleep(clockid_t clock, int flags, const struct timespec *request,
                    struct timespec *remain) {
    static clock_nanosleep_fn next;
    if (clock == CLOCK_MONOTONIC || clock == CLOCK_MONOTONIC_RAW || clock == CLOCK_BOOTTIME) {
        return syscall(SYS_clock_nanosleep, clock, flags, request, remain) == 0 ? 0 : errno;
    }
    if (next == NULL) {
        next = (clock_nanosleep_fn)dlsym(RTLD_NEXT, "clock_nanosleep");
    }
    return next(clock, flags, request, remain);
}
