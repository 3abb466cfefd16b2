/*
 * The ceiling for benchmarks/ring.py: the device side of a split ring in plain C.
 *
 * The same work per batch as iovirt's Cython queue (iovirt/virtio/_queue_c.pyx),
 * on the same layout and the same driver trick: pop up to BATCH available
 * chains (load avail idx with acquire ordering, take each head, walk its
 * descriptors with the virtio 1.2 §2.7.5 rules: head and next in range, no
 * loop, writable after readable, each buffer inside guest memory and turned
 * into a host pointer through a region table with a last-hit cache), write
 * the avail event (EVENT_IDX), push every chain to the used ring, store the
 * used idx with release ordering, and decide whether to notify (§2.7.10,
 * a full barrier first).  The driver re-posts the same chains by bumping
 * avail idx.  No Python anywhere: what Cython cannot beat.
 *
 *     ring_ceiling DESCS_PER_CHAIN SECONDS   ->  prints chains/s
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define QSIZE 256
#define BATCH 32
#define ROUNDS 64
#define MEM (1u << 22)
#define F_NEXT 1
#define F_WRITE 2
#define F_INDIRECT 4

struct desc { uint64_t addr; uint32_t len; uint16_t flags, next; };
struct region { uint64_t gpa, size; uint8_t *host; };
struct seg { uint64_t addr; uint32_t len; uint8_t writable; uint8_t *host; };

static struct region regions[1];
static int nregions = 1, last_region;
struct seg segs[BATCH * QSIZE];
uint16_t heads[BATCH];

static uint8_t *host_of(uint64_t addr, uint64_t len)
{
    struct region *r = &regions[last_region];
    if (addr - r->gpa < r->size && len <= r->size - (addr - r->gpa))
        return r->host + (addr - r->gpa);
    for (int i = 0; i < nregions; i++) {
        r = &regions[i];
        if (addr - r->gpa < r->size && len <= r->size - (addr - r->gpa)) {
            last_region = i;
            return r->host + (addr - r->gpa);
        }
    }
    return NULL;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv)
{
    int per_chain = argc > 1 ? atoi(argv[1]) : 1;
    double seconds = argc > 2 ? atof(argv[2]) : 2.0;
    uint8_t *mem = aligned_alloc(4096, MEM);
    memset(mem, 0, MEM);
    regions[0] = (struct region){0, MEM, mem};
    /* Layout as the Python driver makes it: desc table, avail ring, used ring, buffers. */
    uint64_t desc_gpa = 0x1000, avail_gpa = desc_gpa + 16 * QSIZE, used_gpa = 0x4000, buf_gpa = 0x8000;
    struct desc *table = (struct desc *)(mem + desc_gpa);
    uint16_t *avail = (uint16_t *)(mem + avail_gpa);
    uint8_t *used = mem + used_gpa;
    int nchains = QSIZE / per_chain;
    for (int c = 0; c < nchains; c++)
        for (int k = 0; k < per_chain; k++) {
            int i = c * per_chain + k;
            table[i] = (struct desc){buf_gpa + 2048 * c + 64 * k, 64, k + 1 < per_chain ? F_NEXT : 0, i + 1};
        }
    for (int s = 0; s < QSIZE; s++)
        avail[2 + s] = (s % nchains) * per_chain;
    uint16_t avail_idx = nchains, last_avail = 0, used_idx = 0, signalled = 0;
    __atomic_store_n(&avail[1], avail_idx, __ATOMIC_RELEASE);
    uint64_t done = 0, notifies = 0, errors = 0;
    double start = now(), t;
    do {
        for (int round = 0; round < ROUNDS; round++) {
            uint16_t pending = __atomic_load_n(&avail[1], __ATOMIC_ACQUIRE) - last_avail;
            int count = pending < BATCH ? pending : BATCH, n = 0, nsegs = 0;
            for (int b = 0; b < count; b++) {
                uint16_t head = avail[2 + (last_avail & (QSIZE - 1))];
                last_avail++;
                if (head >= QSIZE) { errors++; break; }
                uint32_t i = head, visited = 0;
                int seen_writable = 0, bad = 0;
                for (;;) {
                    struct desc d;
                    if (++visited > QSIZE) { bad = 1; break; }
                    memcpy(&d, &table[i], sizeof d);
                    if (d.flags & F_INDIRECT) { bad = 1; break; }  /* not exercised here */
                    int writable = (d.flags & F_WRITE) != 0;
                    if (seen_writable && !writable) { bad = 1; break; }
                    seen_writable = writable;
                    if (d.len && d.addr > UINT64_MAX - (d.len - 1)) { bad = 1; break; }
                    uint8_t *host = host_of(d.addr, d.len);
                    if (!host && d.len) { bad = 1; break; }
                    segs[nsegs++] = (struct seg){d.addr, d.len, writable, host};
                    if (!(d.flags & F_NEXT)) break;
                    if (d.next >= QSIZE) { bad = 1; break; }
                    i = d.next;
                }
                if (bad) { errors++; break; }
                heads[n++] = head;
            }
            /* EVENT_IDX: publish avail_event (the used ring's last field). */
            *(uint16_t *)(used + 4 + 8 * QSIZE) = last_avail;
            for (int b = 0; b < n; b++) {
                uint32_t elem[2] = {heads[b], 0};
                memcpy(used + 4 + 8 * (used_idx & (QSIZE - 1)), elem, 8);
                used_idx++;
            }
            __atomic_store_n((uint16_t *)(used + 2), used_idx, __ATOMIC_RELEASE);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            uint16_t used_event = __atomic_load_n(&avail[2 + QSIZE], __ATOMIC_RELAXED);
            if ((uint16_t)(used_idx - used_event - 1) < (uint16_t)(used_idx - signalled))
                notifies++;
            signalled = used_idx;
            done += n;
            avail_idx += n;
            __atomic_store_n(&avail[1], avail_idx, __ATOMIC_RELEASE);
        }
        t = now();
    } while (t - start < seconds);
    if (errors) {
        fprintf(stderr, "ring_ceiling: %llu malformed chains\n", (unsigned long long)errors);
        return 1;
    }
    printf("%.0f %llu\n", done / (t - start), (unsigned long long)notifies);
    free(mem);
    return 0;
}
