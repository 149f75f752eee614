/* The floor under the throughput and CPU figures of bench/run: a TCP relay that does
 * nothing but move bytes, one upstream connection per client connection, kept open.
 * Every HTTP proxy does at least this much per request (a receive and a send each way), so
 * what a two-tier chain of these costs is what no proxy on this machine can go below with
 * the same I/O model.
 *
 *   relay epoll|uring LISTEN_HOST LISTEN_PORT UP_HOST UP_PORT
 *
 * epoll: level-triggered epoll and recv/send, the model of nginx, HAProxy and dmzproxy.
 * uring: io_uring, one io_uring_enter per loop turn for every send and receive of that
 *        turn (IORING_SETUP_DEFER_TASKRUN where the kernel has it; receives poll first).
 * Not an HTTP proxy: no parsing, no rules, no headers. Loopback only; it runs until killed. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

enum { BUF = 16384, MAXPAIRS = 65536 };

struct pair {
    int fd[2];           /* 0: client, 1: upstream */
    int pend[2], off[2]; /* epoll: bytes read from fd[i] not yet all sent to fd[!i] */
    int ops;             /* uring: operations in flight */
    int closing;
    char buf[2][BUF];
};

static struct pair* pairs[MAXPAIRS];
static struct sockaddr_in up_addr;

static struct sockaddr_in address(const char* host, const char* port) {
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)atoi(port));
    if (inet_pton(AF_INET, host, &a.sin_addr) != 1 || (ntohl(a.sin_addr.s_addr) >> 24) != 127) {
        fprintf(stderr, "relay: %s is not a loopback address\n", host);
        exit(2);
    }
    return a;
}

static int listener(struct sockaddr_in a) {
    int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    /* A relay stopped just before may still hold the port for a moment: an io_uring
     * instance is torn down after its process has gone. Wait up to 3 s for it. */
    int r;
    for (int tries = 0; (r = bind(s, (struct sockaddr*)&a, sizeof a)) != 0 && errno == EADDRINUSE && tries < 300; ++tries)
        usleep(10000);
    if (r != 0 || listen(s, 4096) != 0) {
        perror("relay: listen");
        exit(1);
    }
    return s;
}

/* A new pair for an accepted client: the upstream connection is made at once (blocking,
 * on loopback), as a proxy with a warm keep-alive pool would already have it. */
static int new_pair(int c, int nonblock) {
    int one = 1, slot = -1;
    for (int i = 0; i < MAXPAIRS; ++i)
        if (!pairs[i]) {
            slot = i;
            break;
        }
    int u = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (slot < 0 || u < 0 || connect(u, (struct sockaddr*)&up_addr, sizeof up_addr) != 0) {
        close(c);
        if (u >= 0) close(u);
        return -1;
    }
    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(u, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (nonblock) fcntl(u, F_SETFL, fcntl(u, F_GETFL) | O_NONBLOCK);
    struct pair* p = calloc(1, sizeof *p);
    p->fd[0] = c;
    p->fd[1] = u;
    pairs[slot] = p;
    return slot;
}

static void free_pair(int i) {
    close(pairs[i]->fd[0]);
    close(pairs[i]->fd[1]);
    free(pairs[i]);
    pairs[i] = NULL;
}

/* ---------------------------------------------------------------- epoll */

static int ep;

static void ep_set(int i, int side) {
    struct pair* p = pairs[i];
    /* Read a side only when nothing it sent is still waiting; wait for writability of a
     * side that has bytes to take. */
    uint32_t ev = (p->pend[side] ? 0 : EPOLLIN) | (p->pend[!side] ? EPOLLOUT : 0);
    struct epoll_event e = {.events = ev, .data.u64 = ((uint64_t)i << 1) | (uint64_t)side};
    epoll_ctl(ep, EPOLL_CTL_MOD, p->fd[side], &e);
}

static int ep_flush(int i, int from) {
    struct pair* p = pairs[i];
    while (p->pend[from] > 0) {
        ssize_t w = send(p->fd[!from], p->buf[from] + p->off[from], (size_t)p->pend[from], MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && errno == EAGAIN) return 1;
        if (w <= 0) return -1;
        p->off[from] += (int)w;
        p->pend[from] -= (int)w;
    }
    return 0;
}

static int run_epoll(int ls) __attribute__((noreturn));
static int run_epoll(int ls) {
    ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event e = {.events = EPOLLIN, .data.u64 = UINT64_MAX};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &e);
    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        for (int k = 0; k < n; ++k) {
            uint64_t d = evs[k].data.u64;
            if (d == UINT64_MAX) {
                int c;
                while ((c = accept4(ls, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0 || errno == EINTR) {
                    if (c < 0) continue;
                    int i = new_pair(c, 1);
                    if (i < 0) continue;
                    for (int s = 0; s < 2; ++s) {
                        struct epoll_event a = {.events = EPOLLIN, .data.u64 = ((uint64_t)i << 1) | (uint64_t)s};
                        epoll_ctl(ep, EPOLL_CTL_ADD, pairs[i]->fd[s], &a);
                    }
                }
                if (errno == EMFILE || errno == ENFILE) usleep(10000); /* out of descriptors: no busy loop */
                continue;
            }
            int i = (int)(d >> 1), s = (int)(d & 1);
            struct pair* p = pairs[i];
            if (!p) continue; /* closed earlier in this batch */
            /* A hang-up or error on a side whose reading is paused would be reported at
             * every wait: close the pair at once. */
            int bad = (evs[k].events & (EPOLLHUP | EPOLLERR)) && p->pend[s];
            if (!bad && (evs[k].events & EPOLLOUT) && p->pend[!s]) {
                int r = ep_flush(i, !s);
                if (r < 0) bad = 1;
                if (r == 0) {
                    ep_set(i, s);
                    ep_set(i, !s);
                }
            }
            if (!bad && (evs[k].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) && !p->pend[s]) {
                ssize_t r = recv(p->fd[s], p->buf[s], BUF, 0);
                if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
                if (r <= 0) {
                    bad = 1;
                } else {
                    p->pend[s] = (int)r;
                    p->off[s] = 0;
                    int f = ep_flush(i, s);
                    if (f < 0) bad = 1;
                    if (f > 0) {
                        ep_set(i, s);
                        ep_set(i, !s);
                    }
                }
            }
            if (bad) free_pair(i); /* close() also takes both out of the epoll set */
        }
    }
}

/* ---------------------------------------------------------------- io_uring */

enum { OP_ACCEPT, OP_RECV, OP_SEND };
static struct io_uring ring;

static struct io_uring_sqe* sqe(void) {
    struct io_uring_sqe* q = io_uring_get_sqe(&ring);
    if (!q) {
        io_uring_submit(&ring);
        q = io_uring_get_sqe(&ring);
    }
    return q;
}

static uint64_t tag(int i, int side, int op) { return ((uint64_t)i << 8) | ((uint64_t)side << 4) | (uint64_t)op; }

static void ur_recv(int i, int side) {
    struct pair* p = pairs[i];
    struct io_uring_sqe* q = sqe();
    io_uring_prep_recv(q, p->fd[side], p->buf[side], BUF, 0);
    q->ioprio |= IORING_RECVSEND_POLL_FIRST; /* the bytes are rarely there yet */
    io_uring_sqe_set_data64(q, tag(i, side, OP_RECV));
    p->ops++;
}

static void ur_send(int i, int from, int off, int len) {
    struct pair* p = pairs[i];
    struct io_uring_sqe* q = sqe();
    io_uring_prep_send(q, p->fd[!from], p->buf[from] + off, (size_t)len, MSG_NOSIGNAL);
    io_uring_sqe_set_data64(q, tag(i, from, OP_SEND));
    p->off[from] = off;
    p->pend[from] = len;
    p->ops++;
}

static void ur_accept(int ls) {
    struct io_uring_sqe* q = sqe();
    io_uring_prep_multishot_accept(q, ls, NULL, NULL, SOCK_CLOEXEC);
    io_uring_sqe_set_data64(q, tag(0, 0, OP_ACCEPT));
}

static void ur_close(int i) {
    struct pair* p = pairs[i];
    if (!p->closing) {
        p->closing = 1;
        shutdown(p->fd[0], SHUT_RDWR); /* the receives still in flight end now */
        shutdown(p->fd[1], SHUT_RDWR);
    }
    if (p->ops == 0) free_pair(i);
}

static int run_uring(int ls) {
    struct io_uring_params prm;
    memset(&prm, 0, sizeof prm);
    prm.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
    if (io_uring_queue_init_params(4096, &ring, &prm) != 0) {
        memset(&prm, 0, sizeof prm);
        if (io_uring_queue_init_params(4096, &ring, &prm) != 0) {
            fprintf(stderr, "relay: io_uring is not available\n");
            return 1;
        }
    }
    ur_accept(ls);
    for (;;) {
        int r = io_uring_submit_and_wait(&ring, 1);
        if (r < 0 && r != -EINTR) {
            fprintf(stderr, "relay: io_uring_submit_and_wait: %s\n", strerror(-r));
            return 1;
        }
        struct io_uring_cqe* cqe;
        unsigned head, seen = 0;
        io_uring_for_each_cqe(&ring, head, cqe) {
            ++seen;
            uint64_t d = io_uring_cqe_get_data64(cqe);
            int op = (int)(d & 15), s = (int)((d >> 4) & 15), i = (int)(d >> 8), res = cqe->res;
            if (op == OP_ACCEPT) {
                if (res >= 0) {
                    int k = new_pair(res, 0);
                    if (k >= 0) {
                        ur_recv(k, 0);
                        ur_recv(k, 1);
                    }
                }
                if (res == -EINVAL) {
                    fprintf(stderr, "relay: this kernel has no multishot accept\n");
                    return 1;
                }
                if (res == -EMFILE || res == -ENFILE) usleep(10000); /* out of descriptors */
                if (!(cqe->flags & IORING_CQE_F_MORE)) ur_accept(ls);
                continue;
            }
            struct pair* p = pairs[i];
            p->ops--;
            if (p->closing) {
                ur_close(i);
            } else if (op == OP_RECV) {
                if (res <= 0)
                    ur_close(i);
                else
                    ur_send(i, s, 0, res);
            } else if (res <= 0) {
                ur_close(i);
            } else if (res < p->pend[s]) {
                ur_send(i, s, p->off[s] + res, p->pend[s] - res);
            } else {
                p->pend[s] = 0;
                ur_recv(i, s);
            }
        }
        io_uring_cq_advance(&ring, seen);
    }
}

int main(int argc, char** argv) {
    if (argc != 6 || (strcmp(argv[1], "epoll") != 0 && strcmp(argv[1], "uring") != 0)) {
        fprintf(stderr, "usage: relay epoll|uring LISTEN_HOST LISTEN_PORT UP_HOST UP_PORT\n");
        return 2;
    }
    int ls = listener(address(argv[2], argv[3]));
    up_addr = address(argv[4], argv[5]);
    return strcmp(argv[1], "epoll") == 0 ? run_epoll(ls) : run_uring(ls);
}
