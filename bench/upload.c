/* The upload half of bench/run, native so that the client and the sink are not what a
 * proxy's upload rate is measured against.
 *
 *   upload sink ADDRESS PORT        serves requests: reads the head and Content-Length
 *                                   bytes of body, answers 200 with JSON
 *                                   {"first_byte": unix seconds, "done": ..., "bytes": n}
 *   upload send ADDRESS PORT BYTES  one RPC_IN_DATA of BYTES through ADDRESS:PORT; prints
 *                                   {"start": unix seconds, "end": ..., "status": code,
 *                                    "response": the body}
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static struct sockaddr_in address(const char* host, const char* port) {
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((unsigned short)atoi(port));
    if (inet_pton(AF_INET, host, &a.sin_addr) != 1) {
        fprintf(stderr, "upload: bad address %s\n", host);
        exit(2);
    }
    return a;
}

enum { BUF = 1 << 20 };
static char buf[BUF];

/* Reads up to the end of a head into buf; returns its length, the bytes after it in *extra. */
static long read_head(int fd, long* have) {
    long n = 0;
    for (;;) {
        char* end = n >= 4 ? memmem(buf, (size_t)n, "\r\n\r\n", 4) : NULL;
        if (end) {
            *have = n;
            return (end - buf) + 4;
        }
        if (n == BUF) return -1;
        ssize_t r = recv(fd, buf + n, (size_t)(BUF - n), 0);
        if (r <= 0) return -1;
        n += r;
    }
}

static long content_length(long head_len) {
    for (char* p = buf; p < buf + head_len; ++p)
        if ((p == buf || p[-1] == '\n') && strncasecmp(p, "content-length:", 15) == 0) return atol(p + 15);
    return 0;
}

static int sink(const char* host, const char* port) {
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = address(host, port);
    if (bind(s, (struct sockaddr*)&a, sizeof a) != 0 || listen(s, 64) != 0) {
        perror("upload sink");
        return 1;
    }
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0) continue;
        for (;;) {  /* keep-alive: requests one after another */
            long have = 0, head = read_head(c, &have);
            if (head < 0) break;
            long left = content_length(head), got = have - head;
            double first = got > 0 ? now() : 0;
            left -= got;
            while (left > 0) {
                ssize_t r = recv(c, buf, left < BUF ? (size_t)left : BUF, 0);
                if (r <= 0) break;
                if (first == 0) first = now();
                left -= r;
            }
            if (left > 0) break;
            char body[160], resp[320];
            int bl = snprintf(body, sizeof body, "{\"first_byte\": %.6f, \"done\": %.6f, \"bytes\": %ld}", first, now(),
                              content_length(head));
            int rl = snprintf(resp, sizeof resp, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", bl,
                              body);
            if (send(c, resp, (size_t)rl, MSG_NOSIGNAL) != rl) break;
        }
        close(c);
    }
}

static int send_one(const char* host, const char* port, long size) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = address(host, port);
    if (connect(s, (struct sockaddr*)&a, sizeof a) != 0) {
        perror("upload send");
        return 1;
    }
    char head[256];
    int hl = snprintf(head, sizeof head,
                      "RPC_IN_DATA /rpc/rpcproxy.dll?ex01:6001 HTTP/1.1\r\nHost: mail.contoso.com\r\nContent-Type: application/rpc\r\n"
                      "Content-Length: %ld\r\n\r\n",
                      size);
    static char data[BUF];
    memset(data, 'x', sizeof data);
    double start = now();
    if (send(s, head, (size_t)hl, MSG_NOSIGNAL) != hl) return 1;
    for (long left = size; left > 0;) {
        ssize_t w = send(s, data, left < BUF ? (size_t)left : BUF, MSG_NOSIGNAL);
        if (w <= 0) {
            perror("upload send");
            return 1;
        }
        left -= w;
    }
    long have = 0, h = read_head(s, &have);
    if (h < 0) return 1;
    long want = content_length(h);
    while (have - h < want) {
        ssize_t r = recv(s, buf + have, (size_t)(BUF - have), 0);
        if (r <= 0) break;
        have += r;
    }
    double end = now();
    int status = atoi(buf + 9);
    printf("{\"start\": %.6f, \"end\": %.6f, \"status\": %d, \"response\": %.*s}\n", start, end, status, (int)(have - h), buf + h);
    close(s);
    return status == 200 ? 0 : 1;
}

int main(int argc, char** argv) {
    if (argc == 4 && strcmp(argv[1], "sink") == 0) return sink(argv[2], argv[3]);
    if (argc == 5 && strcmp(argv[1], "send") == 0) return send_one(argv[2], argv[3], atol(argv[4]));
    fprintf(stderr, "usage: upload sink ADDRESS PORT | upload send ADDRESS PORT BYTES\n");
    return 2;
}
