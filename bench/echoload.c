/* echoload: closed-loop TCP echo load generator (a measuring tool for the benchmarks).
 *
 *   echoload [-m MODE] [-c CONNS] [-s SIZE] [-d SECONDS] [-t THREADS] [-i MS] HOST PORT
 *
 * MODE
 *   ping     (default) CONNS persistent connections; each sends SIZE bytes,
 *            waits until SIZE bytes come back, repeats.  Reports round trips/s.
 *   connect  CONNS concurrent loops of: connect, send SIZE, read SIZE, close.
 *            Reports connections/s (accept path throughput).
 *   hold     open CONNS connections, then ping each once every second for the
 *            duration; reports how many stayed open and echoed correctly.
 *
 * Output: one line of key=value pairs:
 *   mode= conns= size= secs= ops= ops_per_s= mb_per_s= p50_us= p99_us= p999_us=
 *   max_us= errors= refused= resets= short= still_open= starved= verified_bytes=
 *   (starved: connection slots that never completed one exchange)
 *
 * -i MS (interval mode) adds, before that line, a timeline as it happens:
 *   start_mono_ns= interval_ms=           once, first: CLOCK_MONOTONIC at the start
 *   t_ms= ops= p50_us= p99_us= max_us= failures= errors= refused= resets= short=
 *                                         every MS milliseconds, flushed at once
 * t_ms is the end of the interval, counted from start_mono_ns; an exchange counts
 * in the interval it completed in, a failure in the interval it was seen in
 * (failures is the sum of the four kinds). A percentile of an interval with no
 * completed exchange is printed as -.
 *
 * Every echoed byte is compared with what was sent (payload is a per-connection
 * counter pattern), so a server that answers garbage is counted in errors.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum mode { PING, CONNECT, HOLD };

typedef struct {
    int fd;
    size_t sent, recvd;   /* bytes of the current exchange */
    uint64_t t0;          /* ns when the exchange started */
    uint32_t seq;         /* pattern seed */
    int alive;
    uint64_t done;        /* exchanges completed on this slot */
} conn_t;

typedef struct {
    uint64_t *lat; size_t nlat, caplat;
} lats_t;

typedef struct {
    int id, nconns;
    uint64_t ops, errors, refused, resets, shorts, verified;  /* failure counts: COUNT() only */
    lats_t all;
    int still_open, starved;
    pthread_mutex_t mu;   /* interval mode: guards cur, which the reporter empties */
    lats_t cur;           /* latencies of the current interval */
} worker_t;

/* The interval reporter reads the failure counters while the workers run. */
#define COUNT(x) __atomic_fetch_add(&(x), 1, __ATOMIC_RELAXED)

static enum mode g_mode = PING;
static size_t g_size = 64;
static double g_secs = 5;
static struct sockaddr_storage g_addr; static socklen_t g_addrlen;
static volatile int g_stop;
static uint64_t g_deadline;
static uint64_t g_interval_ns;  /* 0: no timeline */

static uint64_t now_ns(void) {
    struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static void fill(unsigned char *buf, size_t n, uint32_t seq) {
    for (size_t i = 0; i < n; i++) buf[i] = (unsigned char)((seq * 131u + i * 7u) & 0xff);
}

static void add_lat(lats_t *l, uint64_t ns) {
    if (l->nlat == l->caplat) {
        l->caplat = l->caplat ? l->caplat * 2 : 1 << 16;
        l->lat = realloc(l->lat, l->caplat * sizeof(uint64_t));
        if (!l->lat) { perror("echoload"); exit(1); }
    }
    l->lat[l->nlat++] = ns;
}

static void record(worker_t *w, uint64_t ns) {
    w->ops++; add_lat(&w->all, ns);
    if (g_interval_ns) {
        pthread_mutex_lock(&w->mu); add_lat(&w->cur, ns); pthread_mutex_unlock(&w->mu);
    }
}

/* Connect mode opens tens of thousands of connections a second and leaves each client port in
   TIME_WAIT; from one source address the kernel's search for a free port then caps the rate for
   every server alike (seen: about 14k/s, C server included). Toward a 127.x target each new
   connection therefore takes its source from 127.0.0.2-127.0.0.251 in turn (all loopback). */
static int g_spread;
static unsigned g_src_next;

static int open_conn(worker_t *w) {
    int fd = socket(g_addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0) { COUNT(w->errors); return -1; }
    int one = 1; setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (g_spread) {
        struct sockaddr_in src = { .sin_family = AF_INET, .sin_port = 0 };
        unsigned k = __sync_fetch_and_add(&g_src_next, 1) % 250;
        src.sin_addr.s_addr = htonl(0x7f000002u + k);
#ifdef IP_BIND_ADDRESS_NO_PORT
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
#endif
        if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0) { COUNT(w->errors); close(fd); return -1; }
    }
    if (connect(fd, (struct sockaddr *)&g_addr, g_addrlen) < 0 && errno != EINPROGRESS) {
        if (errno == ECONNREFUSED) COUNT(w->refused); else COUNT(w->errors);
        close(fd); return -1;
    }
    return fd;
}

static void *run(void *arg) {
    worker_t *w = arg;
    int ep = epoll_create1(0);
    conn_t *cs = calloc(w->nconns, sizeof(conn_t));
    unsigned char *out = malloc(g_size), *in = malloc(g_size), *expect = malloc(g_size);
    struct epoll_event evs[256];

    for (int i = 0; i < w->nconns; i++) {
        cs[i].seq = (uint32_t)(w->id * 100003 + i);
        cs[i].fd = open_conn(w);
        if (cs[i].fd < 0) continue;
        cs[i].alive = 1; cs[i].t0 = now_ns();
        struct epoll_event ev = { .events = EPOLLOUT | EPOLLIN, .data.u32 = (uint32_t)i };
        epoll_ctl(ep, EPOLL_CTL_ADD, cs[i].fd, &ev);
    }
    uint64_t next_hold_tick = now_ns();
    while (!g_stop) {
        uint64_t t = now_ns();
        if (t >= g_deadline) break;
        int n = epoll_wait(ep, evs, 256, 50);
        for (int k = 0; k < n; k++) {
            conn_t *c = &cs[evs[k].data.u32];
            if (!c->alive) continue;
            int fail = 0;
            if (evs[k].events & (EPOLLERR | EPOLLHUP) && !(evs[k].events & EPOLLIN)) {
                int err = 0; socklen_t l = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
                if (err == ECONNREFUSED) COUNT(w->refused); else if (err == ECONNRESET) COUNT(w->resets); else COUNT(w->errors);
                fail = 1;
            }
            if (!fail && (evs[k].events & EPOLLOUT) && c->sent < g_size) {
                if (g_mode == HOLD && c->sent == 0 && c->recvd == 0 && c->t0 > now_ns()) goto skip_send;
                fill(out, g_size, c->seq);
                ssize_t r = send(c->fd, out + c->sent, g_size - c->sent, MSG_NOSIGNAL);
                if (r < 0 && errno != EAGAIN) { if (errno == ECONNREFUSED) COUNT(w->refused); else if (errno == ECONNRESET || errno == EPIPE) COUNT(w->resets); else COUNT(w->errors); fail = 1; }
                else if (r > 0) c->sent += (size_t)r;
                if (!fail && c->sent == g_size) {
                    struct epoll_event ev = { .events = EPOLLIN, .data.u32 = evs[k].data.u32 };
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                }
            }
        skip_send:
            if (!fail && (evs[k].events & EPOLLIN)) {
                ssize_t r = recv(c->fd, in, g_size - c->recvd, 0);
                if (r == 0) { COUNT(w->shorts); fail = 1; }
                else if (r < 0 && errno != EAGAIN) { if (errno == ECONNREFUSED) COUNT(w->refused); else if (errno == ECONNRESET) COUNT(w->resets); else COUNT(w->errors); fail = 1; }
                else if (r > 0) {
                    fill(expect, g_size, c->seq);
                    if (memcmp(in, expect + c->recvd, (size_t)r) != 0) { COUNT(w->errors); fail = 1; }
                    else { c->recvd += (size_t)r; w->verified += (uint64_t)r; }
                }
                if (!fail && c->recvd == g_size) {
                    uint64_t t1 = now_ns();
                    record(w, t1 - c->t0); c->done++;
                    c->seq++; c->sent = c->recvd = 0;
                    if (g_mode == CONNECT) {
                        epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL); close(c->fd);
                        c->fd = open_conn(w);
                        if (c->fd < 0) { c->alive = 0; continue; }
                        c->t0 = now_ns();
                        struct epoll_event ev = { .events = EPOLLOUT | EPOLLIN, .data.u32 = evs[k].data.u32 };
                        epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
                    } else if (g_mode == HOLD) {
                        c->t0 = next_hold_tick + 1000000000ull; /* next ping on the next tick */
                        struct epoll_event ev = { .events = EPOLLIN, .data.u32 = evs[k].data.u32 };
                        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                    } else {
                        c->t0 = t1;
                        fill(out, g_size, c->seq);
                        ssize_t s = send(c->fd, out, g_size, MSG_NOSIGNAL);
                        if (s < 0 && errno != EAGAIN) { COUNT(w->errors); fail = 1; }
                        else if (s > 0) c->sent = (size_t)s;
                        if (!fail) {
                            struct epoll_event ev = { .events = c->sent < g_size ? (EPOLLIN | EPOLLOUT) : EPOLLIN, .data.u32 = evs[k].data.u32 };
                            epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                        }
                    }
                }
            }
            if (fail) {
                epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL); close(c->fd); c->alive = 0;
                if (g_mode == CONNECT) { /* keep the loop going with a fresh connection */
                    c->fd = open_conn(w);
                    if (c->fd >= 0) {
                        c->alive = 1; c->sent = c->recvd = 0; c->t0 = now_ns();
                        struct epoll_event ev = { .events = EPOLLOUT | EPOLLIN, .data.u32 = evs[k].data.u32 };
                        epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
                    }
                }
            }
        }
        if (g_mode == HOLD && now_ns() >= next_hold_tick + 1000000000ull) {
            next_hold_tick = now_ns();
            for (int i = 0; i < w->nconns; i++) {
                conn_t *c = &cs[i];
                if (!c->alive || c->sent != 0) continue;
                c->t0 = now_ns();
                struct epoll_event ev = { .events = EPOLLOUT | EPOLLIN, .data.u32 = (uint32_t)i };
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
            }
        }
    }
    for (int i = 0; i < w->nconns; i++) {
        if (cs[i].done == 0) w->starved++;
        if (cs[i].alive) { w->still_open++; close(cs[i].fd); }
    }
    close(ep); free(cs); free(out); free(in); free(expect);
    return NULL;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b; return x < y ? -1 : x > y;
}

#define USAGE "usage: echoload [-m ping|connect|hold] [-c conns] [-s size] [-d secs] [-t threads] [-i ms] host port\n"

/* The p-th percentile of a sorted array, in microseconds. */
static uint64_t pct_us(const lats_t *l, double p) {
    return l->nlat ? l->lat[(size_t)((l->nlat - 1) * p)] / 1000 : 0;
}

static uint64_t failures_of(worker_t *ws, int threads, uint64_t out[4]) {
    out[0] = out[1] = out[2] = out[3] = 0;
    for (int i = 0; i < threads; i++) {
        out[0] += __atomic_load_n(&ws[i].errors, __ATOMIC_RELAXED);
        out[1] += __atomic_load_n(&ws[i].refused, __ATOMIC_RELAXED);
        out[2] += __atomic_load_n(&ws[i].resets, __ATOMIC_RELAXED);
        out[3] += __atomic_load_n(&ws[i].shorts, __ATOMIC_RELAXED);
    }
    return out[0] + out[1] + out[2] + out[3];
}

/* Interval mode: take every worker's latencies of the interval that just ended and print its line. */
static void report_interval(worker_t *ws, int threads, uint64_t t_ns, lats_t *merged, uint64_t prev[4]) {
    merged->nlat = 0;
    for (int i = 0; i < threads; i++) {
        pthread_mutex_lock(&ws[i].mu);
        for (size_t j = 0; j < ws[i].cur.nlat; j++) add_lat(merged, ws[i].cur.lat[j]);
        ws[i].cur.nlat = 0;
        pthread_mutex_unlock(&ws[i].mu);
    }
    uint64_t now[4], d[4];
    failures_of(ws, threads, now);
    for (int k = 0; k < 4; k++) { d[k] = now[k] - prev[k]; prev[k] = now[k]; }
    qsort(merged->lat, merged->nlat, sizeof(uint64_t), cmp_u64);
    char p50[24] = "-", p99[24] = "-", mx[24] = "-";
    if (merged->nlat) {
        snprintf(p50, sizeof p50, "%llu", (unsigned long long)pct_us(merged, 0.5));
        snprintf(p99, sizeof p99, "%llu", (unsigned long long)pct_us(merged, 0.99));
        snprintf(mx, sizeof mx, "%llu", (unsigned long long)(merged->lat[merged->nlat - 1] / 1000));
    }
    printf("t_ms=%llu ops=%zu p50_us=%s p99_us=%s max_us=%s failures=%llu errors=%llu refused=%llu "
           "resets=%llu short=%llu\n", (unsigned long long)(t_ns / 1000000), merged->nlat, p50, p99, mx,
           (unsigned long long)(d[0] + d[1] + d[2] + d[3]), (unsigned long long)d[0],
           (unsigned long long)d[1], (unsigned long long)d[2], (unsigned long long)d[3]);
    fflush(stdout);
}

int main(int argc, char **argv) {
    int conns = 50, threads = 1, opt;
    double interval_ms = 0;
    while ((opt = getopt(argc, argv, "m:c:s:d:t:i:")) != -1) {
        switch (opt) {
        case 'm': g_mode = !strcmp(optarg, "connect") ? CONNECT : !strcmp(optarg, "hold") ? HOLD : PING; break;
        case 'c': conns = atoi(optarg); break;
        case 's': g_size = (size_t)atol(optarg); break;
        case 'd': g_secs = atof(optarg); break;
        case 't': threads = atoi(optarg); break;
        case 'i': interval_ms = atof(optarg); break;
        default: fprintf(stderr, USAGE); return 2;
        }
    }
    if (argc - optind != 2 || conns < 1 || threads < 1 || g_size < 1 || interval_ms < 0 ||
        (interval_ms > 0 && interval_ms < 1)) {
        fprintf(stderr, USAGE); return 2;
    }
    g_interval_ns = (uint64_t)(interval_ms * 1e6);
    struct addrinfo hints = { .ai_socktype = SOCK_STREAM }, *res;
    if (getaddrinfo(argv[optind], argv[optind + 1], &hints, &res) != 0) { fprintf(stderr, "echoload: bad address\n"); return 2; }
    memcpy(&g_addr, res->ai_addr, res->ai_addrlen); g_addrlen = res->ai_addrlen; freeaddrinfo(res);
    if (g_mode == CONNECT && g_addr.ss_family == AF_INET &&
        (ntohl(((struct sockaddr_in *)&g_addr)->sin_addr.s_addr) >> 24) == 127 && !getenv("ECHOLOAD_ONE_SOURCE"))
        g_spread = 1;
    if (threads > conns) threads = conns;

    uint64_t start = now_ns();
    g_deadline = start + (uint64_t)(g_secs * 1e9);
    pthread_t *tids = calloc(threads, sizeof(pthread_t));
    worker_t *ws = calloc(threads, sizeof(worker_t));
    if (g_interval_ns) {
        printf("start_mono_ns=%llu interval_ms=%g\n", (unsigned long long)start, interval_ms);
        fflush(stdout);
    }
    for (int i = 0; i < threads; i++) {
        ws[i].id = i; ws[i].nconns = conns / threads + (i < conns % threads);
        pthread_mutex_init(&ws[i].mu, NULL);
        pthread_create(&tids[i], NULL, run, &ws[i]);
    }
    lats_t merged = {0};
    uint64_t prev[4] = {0};
    if (g_interval_ns) {
        /* Report on the interval grid up to the deadline; absolute sleeps, so the grid does not drift. */
        for (uint64_t end = start + g_interval_ns; end <= g_deadline; end += g_interval_ns) {
            struct timespec ts = { .tv_sec = (time_t)(end / 1000000000ull), .tv_nsec = (long)(end % 1000000000ull) };
            while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {}
            report_interval(ws, threads, end - start, &merged, prev);
        }
    }
    for (int i = 0; i < threads; i++) pthread_join(tids[i], NULL);
    uint64_t stop = now_ns();
    if (g_interval_ns) {
        /* What completed after the last full interval (the workers stop at the deadline): a last, short line */
        uint64_t left[4], pending = 0;
        for (int i = 0; i < threads; i++) pending += ws[i].cur.nlat;
        if (pending || failures_of(ws, threads, left) != prev[0] + prev[1] + prev[2] + prev[3])
            report_interval(ws, threads, stop - start, &merged, prev);
    }
    worker_t tot = {0};
    for (int i = 0; i < threads; i++) {
        tot.ops += ws[i].ops; tot.errors += ws[i].errors; tot.refused += ws[i].refused;
        tot.resets += ws[i].resets; tot.shorts += ws[i].shorts; tot.verified += ws[i].verified;
        tot.still_open += ws[i].still_open; tot.starved += ws[i].starved;
        for (size_t j = 0; j < ws[i].all.nlat; j++) add_lat(&tot.all, ws[i].all.lat[j]);
    }
    double secs = (stop - start) / 1e9;
    qsort(tot.all.lat, tot.all.nlat, sizeof(uint64_t), cmp_u64);
    printf("mode=%s conns=%d size=%zu secs=%.2f ops=%llu ops_per_s=%.0f mb_per_s=%.2f "
           "p50_us=%llu p99_us=%llu p999_us=%llu max_us=%llu errors=%llu refused=%llu resets=%llu "
           "short=%llu still_open=%d starved=%d verified_bytes=%llu\n",
           g_mode == PING ? "ping" : g_mode == CONNECT ? "connect" : "hold", conns, g_size, secs,
           (unsigned long long)tot.ops, tot.ops / secs, 2.0 * tot.verified / secs / 1e6,
           (unsigned long long)pct_us(&tot.all, 0.5), (unsigned long long)pct_us(&tot.all, 0.99),
           (unsigned long long)pct_us(&tot.all, 0.999),
           (unsigned long long)(tot.all.nlat ? tot.all.lat[tot.all.nlat - 1] / 1000 : 0),
           (unsigned long long)tot.errors, (unsigned long long)tot.refused, (unsigned long long)tot.resets,
           (unsigned long long)tot.shorts, tot.still_open, tot.starved, (unsigned long long)tot.verified);
    return 0;
}
