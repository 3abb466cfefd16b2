/*
 * The guests of one port-to-port pair for benchmarks/workers.py, in C.
 *
 * Two split rings laid out by iovirt's Python driver: the sender's
 * transmit ring (every chain one 64-byte frame to the receiver) and the
 * receiver's receive ring (every chain one buffer).  The device uses both
 * in order, so a chain goes back on its ring by moving avail idx (virtio
 * 1.2 2.7.13: published with release ordering, then a kick): the loop
 * re-posts what each ring used, counts the receiver's frames, and sleeps
 * on the two call eventfds (the rings ask for every notification: no
 * EVENT_IDX, interrupts on) when neither moved.  Called through ctypes,
 * which releases the GIL, one thread per pair.
 *
 *     gcc -O2 -shared -fPIC -o net_drive.so net_drive.c
 */
#include <poll.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* One ring: its avail idx and used idx words, and its kick and call eventfds. */
struct ring {
    volatile uint16_t *avail_idx;
    volatile uint16_t *used_idx;
    int kick_fd, call_fd;
    uint16_t seen, avail;
};

/* Chains the device used since the last look; made available again and kicked. */
static uint16_t repost(struct ring *r) {
    uint16_t used = __atomic_load_n(r->used_idx, __ATOMIC_ACQUIRE);
    uint16_t n = (uint16_t)(used - r->seen);
    uint64_t one = 1;
    if (!n)
        return 0;
    r->seen = used;
    r->avail = (uint16_t)(r->avail + n);
    __atomic_store_n(r->avail_idx, r->avail, __ATOMIC_RELEASE);
    if (write(r->kick_fd, &one, 8) != 8)
        return 0;
    return n;
}

/* Drive the pair for `seconds`; out: frames received, elapsed ns.  0, or -2 if nothing moved for 5 s. */
int drive(volatile uint16_t *tx_avail, volatile uint16_t *tx_used, int tx_kick, int tx_call,
          volatile uint16_t *rx_avail, volatile uint16_t *rx_used, int rx_kick, int rx_call,
          double seconds, long nap_ns, uint64_t *out) {
    struct ring tx = {tx_avail, tx_used, tx_kick, tx_call, *tx_used, *tx_avail};
    struct ring rx = {rx_avail, rx_used, rx_kick, rx_call, *rx_used, *rx_avail};
    struct pollfd calls[2] = {{tx_call, POLLIN, 0}, {rx_call, POLLIN, 0}};
    uint64_t received = 0, drained;
    uint64_t one = 1;
    double start = now(), end = start + seconds, t = start, last_move = start;
    if (write(tx.kick_fd, &one, 8) != 8)  /* the chains posted before the loop */
        return -1;
    while (t < end) {
        uint16_t got = repost(&rx);
        uint16_t sent = repost(&tx);
        received += got;
        t = now();
        if (got || sent) {
            last_move = t;
            continue;
        }
        if (t - last_move > 5.0)
            return -2;
        if (nap_ns) {
            struct timespec nap = {0, nap_ns};
            nanosleep(&nap, NULL);
        } else if (poll(calls, 2, 10) > 0) {
            for (int i = 0; i < 2; i++)
                if (calls[i].revents & POLLIN)
                    (void)!read(calls[i].fd, &drained, 8);
        }
    }
    out[0] = received;
    out[1] = (uint64_t)((t - start) * 1e9);
    return 0;
}
