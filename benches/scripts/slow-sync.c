/* A disk whose syncs are slow, for benches/scripts/slow-disk.sh: every fsync and fdatasync of the
 * process it is preloaded into (LD_PRELOAD) waits SLOW_SYNC_US microseconds (default 3 s) before
 * it runs, as on a busy array or a network filesystem. Nothing else changes. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <unistd.h>

static void hold(void) {
    const char *us = getenv("SLOW_SYNC_US");
    usleep(us ? (useconds_t)strtoul(us, NULL, 10) : 3000000);
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    hold();
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    hold();
    return real(fd);
}
