/* tlsload: closed-loop TLS echo load generator (OpenSSL), the TLS counterpart of echoload.c.
 *
 *   tlsload [-m MODE] [-c CONNS] [-s SIZE] [-d SECONDS] [-t THREADS] [-v 1.2|1.3] [-n SNI] HOST PORT
 *
 * MODE
 *   handshake  CONNS concurrent loops of: connect, full TLS handshake, send SIZE
 *              bytes, read SIZE back, close_notify, close.  Reports connections/s.
 *   resume     the same, but every connection offers the last session its thread
 *              received (a TLS 1.3 ticket, or a TLS 1.2 ticket or session id), so
 *              the server can resume it.  resumed= counts the handshakes the server
 *              did resume (SSL_session_reused): a run where it fails shows it.
 *   ping       (default) CONNS persistent TLS connections; each sends SIZE bytes,
 *              waits until SIZE bytes come back, repeats.  Reports round trips/s.
 *
 * -v caps the protocol version (default: the newest both sides speak); -n sets
 * the SNI name sent (default localhost; -n '' sends none).  The server's
 * certificate is not verified: this measures the server, whose certificate is
 * a throwaway.  Every echoed byte is compared with what was sent.
 *
 * Output: one line of key=value pairs, echoload's keys plus the TLS ones:
 *   mode= conns= size= secs= ops= ops_per_s= mb_per_s= p50_us= p99_us= p999_us=
 *   max_us= handshakes= resumed= hs_failed= errors= refused= resets= short=
 *   still_open= starved= verified_bytes= proto= cipher=
 * ops: completed echoes (one per connection in handshake and resume modes);
 * latency: from connect to the verified echo (handshake, resume) or per round
 * trip (ping).  Failures, all 0 in a valid run: hs_failed (the handshake failed:
 * an alert, a protocol error, or the peer closed during it), resets
 * (ECONNRESET/EPIPE at any point), short (the peer closed before the whole echo
 * came back), refused, errors (wrong bytes echoed, anything else); starved:
 * connection slots that never completed one echo.  proto and cipher are those of
 * the first handshake (printed as - when none completed); a handshake that
 * negotiated another protocol or cipher is counted in mixed=.
 *
 * On the first failure of each run, one line naming it (with OpenSSL's reason)
 * goes to stderr, so a failing run says why.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum mode { PING, HANDSHAKE, RESUME };
enum state { ST_CONNECT, ST_HANDSHAKE, ST_WRITE, ST_READ, ST_CLOSE };

typedef struct {
    int fd;
    SSL *ssl;
    enum state st;
    uint32_t ev;          /* the epoll interest currently registered */
    size_t recvd;         /* bytes of the current echo read back */
    uint64_t t0;          /* ns when the connection (handshake modes) or round trip (ping) started */
    uint32_t seq;         /* pattern seed */
    int alive;
    uint64_t done;        /* echoes completed on this slot */
} conn_t;

typedef struct {
    uint64_t *lat; size_t nlat, caplat;
} lats_t;

typedef struct {
    int id, nconns;
    uint64_t ops, handshakes, resumed, mixed, hs_failed, errors, refused, resets, shorts, verified;
    lats_t all;
    int still_open, starved;
    SSL_CTX *ctx;
    SSL_SESSION *sess;    /* resume mode: the last resumable session this thread received */
    char proto[32], cipher[64];
} worker_t;

static enum mode g_mode = PING;
static size_t g_size = 64;
static double g_secs = 5;
static int g_maxver;      /* 0: OpenSSL's newest */
static const char *g_sni = "localhost";
static struct sockaddr_storage g_addr; static socklen_t g_addrlen;
static uint64_t g_deadline;
static int g_said;        /* the first failure has been described on stderr */

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
        if (!l->lat) { perror("tlsload"); exit(1); }
    }
    l->lat[l->nlat++] = ns;
}

/* Count a failure; the run's first one is described on stderr (with OpenSSL's queued reason, if any). */
static void fail_count(uint64_t *counter, const char *kind, const char *what, int err) {
    (*counter)++;
    if (__sync_lock_test_and_set(&g_said, 1)) return;
    unsigned long e = ERR_peek_error();
    char reason[256] = "";
    if (e) ERR_error_string_n(e, reason, sizeof reason);
    fprintf(stderr, "tlsload: first failure: %s during %s%s%s%s%s\n", kind, what,
            err ? ": " : "", err ? strerror(err) : "", reason[0] ? ": " : "", reason);
}

/* The handshake modes open a connection per echo and leave each client port in TIME_WAIT; toward a
   127.x target each new connection takes its source from 127.0.0.2-127.0.0.251 in turn, as
   echoload's connect mode does, so the kernel's search for a free port caps no server. */
static int g_spread;
static unsigned g_src_next;

static const char *phase_name(enum state st) {
    switch (st) {
    case ST_CONNECT: return "connect";
    case ST_HANDSHAKE: return "handshake";
    case ST_WRITE: return "write";
    case ST_READ: return "read";
    default: return "close";
    }
}

static void want(int ep, conn_t *c, int idx, uint32_t ev) {
    if (c->ev == ev) return;
    struct epoll_event e = { .events = ev, .data.u32 = (uint32_t)idx };
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e);
    c->ev = ev;
}

/* Start a connection on slot idx: non-blocking connect, then wait until it is writable. */
static int open_conn(worker_t *w, int ep, conn_t *c, int idx) {
    c->ssl = NULL; c->st = ST_CONNECT; c->recvd = 0; c->t0 = now_ns();
    c->fd = socket(g_addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0) { fail_count(&w->errors, "error", "socket", errno); return -1; }
    int one = 1; setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (g_spread) {
        struct sockaddr_in src = { .sin_family = AF_INET, .sin_port = 0 };
        unsigned k = __sync_fetch_and_add(&g_src_next, 1) % 250;
        src.sin_addr.s_addr = htonl(0x7f000002u + k);
#ifdef IP_BIND_ADDRESS_NO_PORT
        setsockopt(c->fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
#endif
        if (bind(c->fd, (struct sockaddr *)&src, sizeof src) < 0) {
            fail_count(&w->errors, "error", "bind", errno); close(c->fd); return -1;
        }
    }
    if (connect(c->fd, (struct sockaddr *)&g_addr, g_addrlen) < 0 && errno != EINPROGRESS) {
        int err = errno;
        if (err == ECONNREFUSED) fail_count(&w->refused, "refused", "connect", err);
        else fail_count(&w->errors, "error", "connect", err);
        close(c->fd); return -1;
    }
    c->ev = EPOLLOUT;
    struct epoll_event e = { .events = EPOLLOUT, .data.u32 = (uint32_t)idx };
    epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &e);
    c->alive = 1;
    return 0;
}

static void close_conn(int ep, conn_t *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    if (c->ssl) SSL_free(c->ssl);
    c->ssl = NULL;
    close(c->fd);
    c->alive = 0;
}

/* After an SSL call returned r <= 0 (err: errno right after it): 0 if it only has to wait (the
   interest is set), 1 if the connection failed (counted). */
static int ssl_wait_or_fail(worker_t *w, int ep, conn_t *c, int idx, int r, int err) {
    int e = SSL_get_error(c->ssl, r);
    if (e == SSL_ERROR_WANT_READ) { want(ep, c, idx, EPOLLIN); return 0; }
    if (e == SSL_ERROR_WANT_WRITE) { want(ep, c, idx, EPOLLOUT); return 0; }
    const char *what = phase_name(c->st);
    unsigned long q = ERR_peek_error();
    int eof = e == SSL_ERROR_ZERO_RETURN || (e == SSL_ERROR_SYSCALL && err == 0) ||
              (e == SSL_ERROR_SSL && ERR_GET_REASON(q) == SSL_R_UNEXPECTED_EOF_WHILE_READING);
    if (e == SSL_ERROR_SYSCALL && (err == ECONNRESET || err == EPIPE)) fail_count(&w->resets, "reset", what, err);
    else if (c->st == ST_HANDSHAKE) fail_count(&w->hs_failed, eof ? "peer closed" : "handshake failed", what, err);
    else if (eof) fail_count(&w->shorts, "short read (peer closed)", what, 0);
    else fail_count(&w->errors, "error", what, e == SSL_ERROR_SYSCALL ? err : 0);
    ERR_clear_error();
    return 1;
}

/* Run slot idx's state machine as far as it goes without waiting. 1: the connection failed. */
static int drive(worker_t *w, int ep, conn_t *cs, int idx, uint32_t events, unsigned char *out,
                 unsigned char *in, unsigned char *expect) {
    conn_t *c = &cs[idx];
    for (;;) {
        int r, err;
        switch (c->st) {
        case ST_CONNECT: {
            int soerr = 0; socklen_t l = sizeof soerr;
            getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &soerr, &l);
            if (soerr) {
                if (soerr == ECONNREFUSED) fail_count(&w->refused, "refused", "connect", soerr);
                else if (soerr == ECONNRESET) fail_count(&w->resets, "reset", "connect", soerr);
                else fail_count(&w->errors, "error", "connect", soerr);
                return 1;
            }
            if (!(events & EPOLLOUT)) {
                if (!(events & (EPOLLERR | EPOLLHUP))) return 0;
                fail_count(&w->errors, "error", "connect (hang-up)", 0);
                return 1;
            }
            c->ssl = SSL_new(w->ctx);
            if (!c->ssl || !SSL_set_fd(c->ssl, c->fd)) { fail_count(&w->errors, "error", "SSL_new", 0); return 1; }
            if (g_sni[0]) SSL_set_tlsext_host_name(c->ssl, g_sni);
            if (g_mode == RESUME && w->sess) SSL_set_session(c->ssl, w->sess);
            c->st = ST_HANDSHAKE;
            break;
        }
        case ST_HANDSHAKE:
            ERR_clear_error(); errno = 0;
            r = SSL_connect(c->ssl); err = errno;
            if (r != 1) return ssl_wait_or_fail(w, ep, c, idx, r, err);
            w->handshakes++;
            if (SSL_session_reused(c->ssl)) w->resumed++;
            if (!w->proto[0]) {
                snprintf(w->proto, sizeof w->proto, "%s", SSL_get_version(c->ssl));
                snprintf(w->cipher, sizeof w->cipher, "%s", SSL_get_cipher_name(c->ssl));
            } else if (strcmp(w->proto, SSL_get_version(c->ssl)) || strcmp(w->cipher, SSL_get_cipher_name(c->ssl))) {
                w->mixed++;
            }
            c->st = ST_WRITE;
            break;
        case ST_WRITE:
            /* SSL_write writes all or, on WANT_*, must be called again with the same bytes: fill() gives them */
            fill(out, g_size, c->seq);
            ERR_clear_error(); errno = 0;
            r = SSL_write(c->ssl, out, (int)g_size); err = errno;
            if (r <= 0) return ssl_wait_or_fail(w, ep, c, idx, r, err);
            c->recvd = 0;
            c->st = ST_READ;
            break;
        case ST_READ:
            ERR_clear_error(); errno = 0;
            r = SSL_read(c->ssl, in, (int)(g_size - c->recvd)); err = errno;
            if (r <= 0) return ssl_wait_or_fail(w, ep, c, idx, r, err);
            fill(expect, g_size, c->seq);
            if (memcmp(in, expect + c->recvd, (size_t)r) != 0) {
                fail_count(&w->errors, "wrong bytes echoed", "read", 0); return 1;
            }
            c->recvd += (size_t)r; w->verified += (uint64_t)r;
            if (c->recvd < g_size) break;
            {
                uint64_t t1 = now_ns();
                w->ops++; add_lat(&w->all, t1 - c->t0); c->done++; c->seq++;
                if (g_mode == PING) { c->t0 = t1; c->st = ST_WRITE; break; }
            }
            if (g_mode == RESUME) {  /* by now a TLS 1.3 ticket has come (it precedes the echo) */
                SSL_SESSION *s = SSL_get1_session(c->ssl);
                if (s && SSL_SESSION_is_resumable(s)) {
                    if (w->sess) SSL_SESSION_free(w->sess);
                    w->sess = s;
                } else if (s) {
                    SSL_SESSION_free(s);
                }
            }
            c->st = ST_CLOSE;
            break;
        case ST_CLOSE:
            /* Send close_notify and close without waiting for the server's (a browser does the same).
               The echo has been verified, so an error here is not a failure of this exchange. */
            ERR_clear_error();
            r = SSL_shutdown(c->ssl);
            if (r < 0 && SSL_get_error(c->ssl, r) == SSL_ERROR_WANT_WRITE) { want(ep, c, idx, EPOLLOUT); return 0; }
            ERR_clear_error();
            close_conn(ep, c);
            if (open_conn(w, ep, c, idx) < 0) c->alive = 0;
            return 0;
        }
    }
}

static void *run(void *arg) {
    worker_t *w = arg;
    w->ctx = SSL_CTX_new(TLS_client_method());
    if (!w->ctx) { fprintf(stderr, "tlsload: SSL_CTX_new failed\n"); exit(1); }
    SSL_CTX_set_verify(w->ctx, SSL_VERIFY_NONE, NULL);
    SSL_CTX_set_session_cache_mode(w->ctx, SSL_SESS_CACHE_OFF);  /* resume mode keeps its session itself */
    SSL_CTX_set_mode(w->ctx, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    if (g_maxver) SSL_CTX_set_max_proto_version(w->ctx, g_maxver);
    int ep = epoll_create1(0);
    conn_t *cs = calloc(w->nconns, sizeof(conn_t));
    unsigned char *out = malloc(g_size), *in = malloc(g_size), *expect = malloc(g_size);
    struct epoll_event evs[256];

    for (int i = 0; i < w->nconns; i++) {
        cs[i].seq = (uint32_t)(w->id * 100003 + i);
        open_conn(w, ep, &cs[i], i);
    }
    while (now_ns() < g_deadline) {
        int n = epoll_wait(ep, evs, 256, 50);
        for (int k = 0; k < n; k++) {
            int idx = (int)evs[k].data.u32;
            conn_t *c = &cs[idx];
            if (!c->alive) continue;
            if (!drive(w, ep, cs, idx, evs[k].events, out, in, expect)) continue;
            close_conn(ep, c);
            if (g_mode != PING) open_conn(w, ep, c, idx);  /* keep the loop going with a fresh connection */
        }
    }
    for (int i = 0; i < w->nconns; i++) {
        if (cs[i].done == 0) w->starved++;
        if (cs[i].alive) { w->still_open++; close_conn(ep, &cs[i]); }
    }
    if (w->sess) SSL_SESSION_free(w->sess);
    SSL_CTX_free(w->ctx);
    close(ep); free(cs); free(out); free(in); free(expect);
    return NULL;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b; return x < y ? -1 : x > y;
}

/* The p-th percentile of a sorted array, in microseconds. */
static uint64_t pct_us(const lats_t *l, double p) {
    return l->nlat ? l->lat[(size_t)((l->nlat - 1) * p)] / 1000 : 0;
}

#define USAGE "usage: tlsload [-m handshake|resume|ping] [-c conns] [-s size] [-d secs] [-t threads] " \
              "[-v 1.2|1.3] [-n sni] host port\n"

int main(int argc, char **argv) {
    int conns = 50, threads = 1, opt;
    while ((opt = getopt(argc, argv, "m:c:s:d:t:v:n:")) != -1) {
        switch (opt) {
        case 'm':
            if (!strcmp(optarg, "handshake")) g_mode = HANDSHAKE;
            else if (!strcmp(optarg, "resume")) g_mode = RESUME;
            else if (!strcmp(optarg, "ping")) g_mode = PING;
            else { fprintf(stderr, USAGE); return 2; }
            break;
        case 'c': conns = atoi(optarg); break;
        case 's': g_size = (size_t)atol(optarg); break;
        case 'd': g_secs = atof(optarg); break;
        case 't': threads = atoi(optarg); break;
        case 'v':
            if (!strcmp(optarg, "1.2")) g_maxver = TLS1_2_VERSION;
            else if (!strcmp(optarg, "1.3")) g_maxver = TLS1_3_VERSION;
            else { fprintf(stderr, USAGE); return 2; }
            break;
        case 'n': g_sni = optarg; break;
        default: fprintf(stderr, USAGE); return 2;
        }
    }
    if (argc - optind != 2 || conns < 1 || threads < 1 || g_size < 1 || g_size > (1 << 20) || g_secs <= 0) {
        fprintf(stderr, USAGE); return 2;
    }
    struct addrinfo hints = { .ai_socktype = SOCK_STREAM }, *res;
    if (getaddrinfo(argv[optind], argv[optind + 1], &hints, &res) != 0) { fprintf(stderr, "tlsload: bad address\n"); return 2; }
    memcpy(&g_addr, res->ai_addr, res->ai_addrlen); g_addrlen = res->ai_addrlen; freeaddrinfo(res);
    if (g_mode != PING && g_addr.ss_family == AF_INET &&
        (ntohl(((struct sockaddr_in *)&g_addr)->sin_addr.s_addr) >> 24) == 127 && !getenv("TLSLOAD_ONE_SOURCE"))
        g_spread = 1;
    if (threads > conns) threads = conns;

    uint64_t start = now_ns();
    g_deadline = start + (uint64_t)(g_secs * 1e9);
    pthread_t *tids = calloc(threads, sizeof(pthread_t));
    worker_t *ws = calloc(threads, sizeof(worker_t));
    for (int i = 0; i < threads; i++) {
        ws[i].id = i; ws[i].nconns = conns / threads + (i < conns % threads);
        pthread_create(&tids[i], NULL, run, &ws[i]);
    }
    for (int i = 0; i < threads; i++) pthread_join(tids[i], NULL);
    uint64_t stop = now_ns();
    worker_t tot = {0};
    const char *proto = "-", *cipher = "-";
    for (int i = 0; i < threads; i++) {
        worker_t *w = &ws[i];
        tot.ops += w->ops; tot.handshakes += w->handshakes; tot.resumed += w->resumed; tot.mixed += w->mixed;
        tot.hs_failed += w->hs_failed; tot.errors += w->errors; tot.refused += w->refused;
        tot.resets += w->resets; tot.shorts += w->shorts; tot.verified += w->verified;
        tot.still_open += w->still_open; tot.starved += w->starved;
        for (size_t j = 0; j < w->all.nlat; j++) add_lat(&tot.all, w->all.lat[j]);
        if (w->proto[0]) {
            if (proto[0] == '-') { proto = w->proto; cipher = w->cipher; }
            else if (strcmp(proto, w->proto) || strcmp(cipher, w->cipher)) tot.mixed++;
        }
    }
    double secs = (stop - start) / 1e9;
    qsort(tot.all.lat, tot.all.nlat, sizeof(uint64_t), cmp_u64);
    printf("mode=%s conns=%d size=%zu secs=%.2f ops=%llu ops_per_s=%.0f mb_per_s=%.2f "
           "p50_us=%llu p99_us=%llu p999_us=%llu max_us=%llu handshakes=%llu resumed=%llu hs_failed=%llu "
           "errors=%llu refused=%llu resets=%llu short=%llu still_open=%d starved=%d verified_bytes=%llu "
           "proto=%s cipher=%s mixed=%llu\n",
           g_mode == PING ? "ping" : g_mode == HANDSHAKE ? "handshake" : "resume", conns, g_size, secs,
           (unsigned long long)tot.ops, tot.ops / secs, 2.0 * tot.verified / secs / 1e6,
           (unsigned long long)pct_us(&tot.all, 0.5), (unsigned long long)pct_us(&tot.all, 0.99),
           (unsigned long long)pct_us(&tot.all, 0.999),
           (unsigned long long)(tot.all.nlat ? tot.all.lat[tot.all.nlat - 1] / 1000 : 0),
           (unsigned long long)tot.handshakes, (unsigned long long)tot.resumed, (unsigned long long)tot.hs_failed,
           (unsigned long long)tot.errors, (unsigned long long)tot.refused, (unsigned long long)tot.resets,
           (unsigned long long)tot.shorts, tot.still_open, tot.starved, (unsigned long long)tot.verified,
           proto, cipher, (unsigned long long)tot.mixed);
    return 0;
}
