/* linkemu: a two-port userspace link emulator (resync's test and benchmark tool).
 *
 *   linkemu forward IF_A IF_B     forward Ethernet frames between two interfaces,
 *                                 commands on stdin, answers on stdout
 *   linkemu offload IF...         turn off checksum, segmentation and receive
 *                                 offloads of interfaces in this network namespace
 *
 * It sits in a network namespace of its own between two veth peers (see
 * tests/linkemu/__init__.py) and reads every frame arriving on either with an
 * AF_PACKET socket. Per direction ("ab": IF_A to IF_B, "ba" back), in the
 * order a frame meets them:
 *
 *   blackout   everything is dropped until the blackout ends;
 *   queue      a drop-tail queue of at most `queue` seconds at the link rate in
 *              front of a serialiser of `rate` bit/s (0: no rate cap); a frame
 *              leaves it at max(now, link free) + 8 * length / rate;
 *   loss       on the wire (a lost frame has used its time on the link, as on
 *              a lossy radio link: payload goodput at loss p is at most
 *              (1 - p) x rate): independent random loss (probability), then
 *              bursty loss from a Gilbert-Elliott chain (p_gb: good to bad,
 *              p_bg: bad to good, and the loss probability in each state:
 *              ge_good, ge_bad);
 *   delay      then `delay` seconds plus a uniform jitter in [0, `jitter`),
 *              in order (a frame never overtakes the one before it), except
 *              that with probability `reorder` a frame is held `reorder_gap`
 *              seconds more, and later frames overtake it;
 *   dup        with probability `dup` a second copy follows;
 *   corrupt    with probability `corrupt` one bit of an IPv4 UDP payload is
 *              flipped and the UDP checksum cleared (0: none, RFC 768), so the
 *              receiver's kernel delivers it and the application must catch it.
 *
 * Commands (one per line): "set DIR key=value..." (DIR: ab, ba or both),
 * "blackout SECONDS" (both directions, from now), "seed N", "stats" (one JSON
 * line of counters per direction), "quit". Answers: "ok", the JSON line, or
 * "error: ...". It runs at SCHED_FIFO priority when allowed and sleeps with
 * ppoll to the nanosecond (timer slack 1 us), so departures are on time to a
 * few microseconds at 100 Mbit/s (about 120 us per 1,514-byte frame).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/ethtool.h>
#include <linux/if_packet.h>
#include <linux/sockios.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define SLOT 2048                 /* bytes per frame slot (MTU 1500 frames are <= 1518) */
#define SLOTS 32768               /* frames held at once, both directions (64 MiB) */

struct params {
    double rate, delay, jitter, loss, p_gb, p_bg, ge_good, ge_bad, reorder, reorder_gap, dup, corrupt, queue;
};

struct counters {
    uint64_t received, received_bytes, sent, sent_bytes, lost_random, lost_burst, lost_queue, lost_blackout,
        lost_pool, lost_send, duplicated, corrupted, reordered;
};

struct dir {
    struct params p;
    struct counters c;
    int bad;                      /* Gilbert-Elliott state */
    int64_t link_free;            /* ns: when the serialiser is free */
    int64_t last_out;             /* ns: the latest in-order delivery time given */
    int in_fd, out_fd;
};

struct slot {
    int64_t due;                  /* ns */
    uint64_t seq;
    int out_fd;
    int dir;
    int len;
    unsigned char *data;
};

static struct dir dirs[2];
static struct slot *heap[SLOTS];
static int heap_n;
static struct slot slots[SLOTS];
static struct slot *free_list[SLOTS];
static int free_n;
static unsigned char *pool;
static uint64_t seq;
static int64_t blackout_until;
static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* xorshift64* (Vigna, "An experimental exploration of Marsaglia's xorshift generators", 2016) */
static double uniform(void) {
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (double)((rng_state * 0x2545F4914F6CDD1Dull) >> 11) * (1.0 / 9007199254740992.0);
}

/* splitmix64 (Steele et al., "Fast splittable pseudorandom number generators", 2014): a seed to a state */
static void seed_rng(uint64_t seed) {
    uint64_t z = seed + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    rng_state = (z ^ (z >> 31)) | 1;
}

static int earlier(const struct slot *a, const struct slot *b) {
    return a->due < b->due || (a->due == b->due && a->seq < b->seq);
}

static void heap_push(struct slot *s) {
    int i = heap_n++;
    heap[i] = s;
    while (i > 0) {
        int parent = (i - 1) / 2;
        if (!earlier(heap[i], heap[parent])) break;
        struct slot *t = heap[i]; heap[i] = heap[parent]; heap[parent] = t;
        i = parent;
    }
}

static struct slot *heap_pop(void) {
    struct slot *top = heap[0];
    heap[0] = heap[--heap_n];
    int i = 0;
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        if (l < heap_n && earlier(heap[l], heap[m])) m = l;
        if (r < heap_n && earlier(heap[r], heap[m])) m = r;
        if (m == i) break;
        struct slot *t = heap[i]; heap[i] = heap[m]; heap[m] = t;
        i = m;
    }
    return top;
}

static void corrupt_udp(unsigned char *f, int len) {
    /* Ethernet (14) + IPv4 header (IHL * 4) + UDP header (8), then the payload */
    if (len < 14 + 20 + 8 + 1 || f[12] != 0x08 || f[13] != 0x00 || (f[14] >> 4) != 4 || f[23] != 17) return;
    int ihl = (f[14] & 15) * 4, udp = 14 + ihl, payload = udp + 8;
    if (ihl < 20 || payload >= len) return;
    int at = payload + (int)(uniform() * (len - payload));
    if (at >= len) at = len - 1;
    f[at] ^= (unsigned char)(1u << (int)(uniform() * 8));
    f[udp + 6] = f[udp + 7] = 0;
}

static void enqueue(int d, const unsigned char *frame, int len, int64_t now) {
    struct dir *x = &dirs[d];
    struct params *p = &x->p;
    x->c.received++;
    x->c.received_bytes += len;
    if (now < blackout_until) { x->c.lost_blackout++; return; }
    int64_t leave = now;
    if (p->rate > 0) {
        int64_t start = x->link_free > now ? x->link_free : now;
        if ((double)(start - now) > p->queue * 1e9) { x->c.lost_queue++; return; }
        leave = start + (int64_t)(8.0 * len / p->rate * 1e9);
        x->link_free = leave;
    }
    if (p->loss > 0 && uniform() < p->loss) { x->c.lost_random++; return; }
    if (p->p_gb > 0 || x->bad) {
        if (x->bad) { if (uniform() < p->p_bg) x->bad = 0; }
        else if (uniform() < p->p_gb) x->bad = 1;
        if (uniform() < (x->bad ? p->ge_bad : p->ge_good)) { x->c.lost_burst++; return; }
    }
    int copies = (p->dup > 0 && uniform() < p->dup) ? 2 : 1;
    if (copies == 2) x->c.duplicated++;
    for (int n = 0; n < copies; n++) {
        if (free_n == 0) { x->c.lost_pool++; return; }
        struct slot *s = free_list[--free_n];
        int64_t due = leave + (int64_t)((p->delay + (p->jitter > 0 ? uniform() * p->jitter : 0)) * 1e9);
        if (due < x->last_out) due = x->last_out;           /* in order */
        x->last_out = due;
        if (p->reorder > 0 && uniform() < p->reorder) {       /* held back: later frames overtake it */
            due += (int64_t)(p->reorder_gap * 1e9);
            x->c.reordered++;
        }
        memcpy(s->data, frame, (size_t)len);
        s->len = len;
        if (p->corrupt > 0 && uniform() < p->corrupt) { corrupt_udp(s->data, len); x->c.corrupted++; }
        s->due = due;
        s->seq = seq++;
        s->out_fd = x->out_fd;
        s->dir = d;
        heap_push(s);
    }
}

static void deliver(int64_t now) {
    while (heap_n > 0 && heap[0]->due <= now) {
        struct slot *s = heap_pop();
        struct dir *x = &dirs[s->dir];
        if (send(s->out_fd, s->data, (size_t)s->len, MSG_DONTWAIT) == s->len) {
            x->c.sent++;
            x->c.sent_bytes += s->len;
        } else {
            x->c.lost_send++;
        }
        free_list[free_n++] = s;
    }
}

static int open_port(const char *ifname) {
    int fd = socket(AF_PACKET, SOCK_RAW | SOCK_NONBLOCK | SOCK_CLOEXEC, htons(ETH_P_ALL));
    if (fd < 0) { perror("linkemu: socket(AF_PACKET)"); exit(2); }
    unsigned idx = if_nametoindex(ifname);
    if (idx == 0) { fprintf(stderr, "linkemu: no interface %s\n", ifname); exit(2); }
    struct sockaddr_ll a = {0};
    a.sll_family = AF_PACKET;
    a.sll_protocol = htons(ETH_P_ALL);
    a.sll_ifindex = (int)idx;
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) { perror("linkemu: bind"); exit(2); }
    int one = 1, big = 16 << 20;
    if (setsockopt(fd, SOL_PACKET, PACKET_IGNORE_OUTGOING, &one, sizeof one) < 0) {
        perror("linkemu: PACKET_IGNORE_OUTGOING"); exit(2);
    }
    setsockopt(fd, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof one);
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof big) < 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &big, sizeof big) < 0)
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
    return fd;
}

static int set_param(struct params *p, const char *key, double v) {
    static const struct { const char *name; size_t off; } keys[] = {
        {"rate", offsetof(struct params, rate)}, {"delay", offsetof(struct params, delay)},
        {"jitter", offsetof(struct params, jitter)}, {"loss", offsetof(struct params, loss)},
        {"p_gb", offsetof(struct params, p_gb)}, {"p_bg", offsetof(struct params, p_bg)},
        {"ge_good", offsetof(struct params, ge_good)}, {"ge_bad", offsetof(struct params, ge_bad)},
        {"reorder", offsetof(struct params, reorder)}, {"reorder_gap", offsetof(struct params, reorder_gap)},
        {"dup", offsetof(struct params, dup)}, {"corrupt", offsetof(struct params, corrupt)},
        {"queue", offsetof(struct params, queue)},
    };
    if (v < 0) return -1;
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++)
        if (strcmp(key, keys[i].name) == 0) { *(double *)((char *)p + keys[i].off) = v; return 0; }
    return -1;
}

static void print_counters(const char *name, const struct dir *x, int last) {
    const struct counters *c = &x->c;
    printf("\"%s\": {\"received\": %llu, \"received_bytes\": %llu, \"sent\": %llu, \"sent_bytes\": %llu, "
           "\"lost_random\": %llu, \"lost_burst\": %llu, \"lost_queue\": %llu, \"lost_blackout\": %llu, "
           "\"lost_pool\": %llu, \"lost_send\": %llu, \"duplicated\": %llu, \"corrupted\": %llu, "
           "\"reordered\": %llu}%s", name,
           (unsigned long long)c->received, (unsigned long long)c->received_bytes, (unsigned long long)c->sent,
           (unsigned long long)c->sent_bytes, (unsigned long long)c->lost_random,
           (unsigned long long)c->lost_burst, (unsigned long long)c->lost_queue,
           (unsigned long long)c->lost_blackout, (unsigned long long)c->lost_pool,
           (unsigned long long)c->lost_send, (unsigned long long)c->duplicated,
           (unsigned long long)c->corrupted, (unsigned long long)c->reordered, last ? "" : ", ");
}

/* One command line; returns 0 to go on, 1 to quit. */
static int command(char *line, int64_t now) {
    char *save = NULL, *word = strtok_r(line, " \t\r\n", &save);
    if (word == NULL) return 0;
    if (strcmp(word, "quit") == 0) return 1;
    if (strcmp(word, "stats") == 0) {
        printf("{");
        print_counters("ab", &dirs[0], 0);
        print_counters("ba", &dirs[1], 1);
        printf(", \"held\": %d}\n", heap_n);
    } else if (strcmp(word, "seed") == 0) {
        char *v = strtok_r(NULL, " \t\r\n", &save);
        if (v) seed_rng(strtoull(v, NULL, 10));
        printf("ok\n");
    } else if (strcmp(word, "blackout") == 0) {
        char *v = strtok_r(NULL, " \t\r\n", &save);
        double s = v ? strtod(v, NULL) : -1;
        if (s < 0) { printf("error: blackout needs seconds\n"); }
        else { blackout_until = now + (int64_t)(s * 1e9); printf("ok\n"); }
    } else if (strcmp(word, "set") == 0) {
        char *which = strtok_r(NULL, " \t\r\n", &save);
        int lo = 0, hi = 1;
        if (which && strcmp(which, "ab") == 0) hi = 0;
        else if (which && strcmp(which, "ba") == 0) lo = 1;
        else if (!which || strcmp(which, "both") != 0) { printf("error: set ab|ba|both key=value...\n"); goto out; }
        struct params p[2] = {dirs[0].p, dirs[1].p};
        char *kv;
        while ((kv = strtok_r(NULL, " \t\r\n", &save)) != NULL) {
            char *eq = strchr(kv, '=');
            char *end;
            if (!eq) { printf("error: %s: not key=value\n", kv); goto out; }
            *eq = 0;
            double v = strtod(eq + 1, &end);
            if (*end != 0) { printf("error: %s: not a number\n", kv); goto out; }
            for (int d = lo; d <= hi; d++)
                if (set_param(&p[d], kv, v) < 0) { printf("error: %s: unknown key or negative\n", kv); goto out; }
        }
        for (int d = lo; d <= hi; d++) dirs[d].p = p[d];
        printf("ok\n");
    } else {
        printf("error: unknown command %s\n", word);
    }
out:
    fflush(stdout);
    return 0;
}

static int offload(int argc, char **argv) {
    static const unsigned cmds[] = {ETHTOOL_STSO, ETHTOOL_SGSO, ETHTOOL_SGRO, ETHTOOL_STXCSUM, ETHTOOL_SRXCSUM,
                                    ETHTOOL_SSG};
    static const char *names[] = {"tso", "gso", "gro", "tx checksum", "rx checksum", "scatter-gather"};
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0), rc = 0;
    if (fd < 0) { perror("linkemu: socket"); return 2; }
    for (int i = 2; i < argc; i++) {
        for (size_t c = 0; c < sizeof cmds / sizeof cmds[0]; c++) {
            struct ethtool_value ev = {.cmd = cmds[c], .data = 0};
            struct ifreq ifr = {0};
            strncpy(ifr.ifr_name, argv[i], IFNAMSIZ - 1);
            ifr.ifr_data = (void *)&ev;
            if (ioctl(fd, SIOCETHTOOL, &ifr) < 0 && errno != EOPNOTSUPP) {
                fprintf(stderr, "linkemu: %s: cannot turn off %s: %s\n", argv[i], names[c], strerror(errno));
                rc = 2;
            }
        }
    }
    close(fd);
    return rc;
}

int main(int argc, char **argv) {
    if (argc >= 3 && strcmp(argv[1], "offload") == 0) return offload(argc, argv);
    if (argc != 4 || strcmp(argv[1], "forward") != 0) {
        fprintf(stderr, "usage: linkemu forward IF_A IF_B | linkemu offload IF...\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    seed_rng(1);
    prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);
    struct sched_param sp = {.sched_priority = 10};
    int realtime = sched_setscheduler(0, SCHED_FIFO, &sp) == 0;
    pool = malloc((size_t)SLOTS * SLOT);
    if (!pool) { fprintf(stderr, "linkemu: out of memory\n"); return 2; }
    for (int i = 0; i < SLOTS; i++) { slots[i].data = pool + (size_t)i * SLOT; free_list[free_n++] = &slots[i]; }
    int a = open_port(argv[2]), b = open_port(argv[3]);
    dirs[0].in_fd = a; dirs[0].out_fd = b;
    dirs[1].in_fd = b; dirs[1].out_fd = a;
    for (int d = 0; d < 2; d++) dirs[d].p.queue = 0.1;
    printf("ready%s\n", realtime ? " (SCHED_FIFO)" : "");
    fflush(stdout);

    static unsigned char frame[65536];
    static char line[4096];
    size_t line_len = 0;
    struct pollfd fds[3] = {{a, POLLIN, 0}, {b, POLLIN, 0}, {0, POLLIN, 0}};
    for (;;) {
        int64_t now = now_ns();
        struct timespec ts, *timeout = NULL;
        if (heap_n > 0) {
            int64_t wait = heap[0]->due - now;
            if (wait < 0) wait = 0;
            ts.tv_sec = wait / 1000000000LL;
            ts.tv_nsec = wait % 1000000000LL;
            timeout = &ts;
        }
        if (ppoll(fds, 3, timeout, NULL) < 0 && errno != EINTR) { perror("linkemu: ppoll"); return 2; }
        now = now_ns();
        for (int d = 0; d < 2; d++) {
            if (!(fds[d].revents & POLLIN)) continue;
            for (int n = 0; n < 256; n++) {
                ssize_t len = recv(fds[d].fd, frame, sizeof frame, MSG_DONTWAIT | MSG_TRUNC);
                if (len < 0) break;
                if (len > SLOT) { dirs[d].c.received++; dirs[d].c.lost_pool++; continue; }
                enqueue(d, frame, (int)len, now);
            }
        }
        if (fds[2].revents & (POLLIN | POLLHUP)) {
            ssize_t n = read(0, line + line_len, sizeof line - 1 - line_len);
            if (n <= 0) return 0;                       /* stdin closed: the owner is gone */
            line_len += (size_t)n;
            line[line_len] = 0;
            char *nl;
            while ((nl = strchr(line, '\n')) != NULL) {
                *nl = 0;
                if (command(line, now)) return 0;
                line_len -= (size_t)(nl + 1 - line);
                memmove(line, nl + 1, line_len + 1);
            }
            if (line_len == sizeof line - 1) line_len = 0;   /* an overlong line: dropped */
        }
        deliver(now_ns());
    }
}
