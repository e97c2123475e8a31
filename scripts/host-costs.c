/*
 * host-costs: what the kernel charges per operation on this machine, to
 * read relay-loadgen's per-datagram CPU figures against.
 *
 *   cc -O2 -pthread scripts/host-costs.c -o /tmp/host-costs
 *   taskset -c 1 /tmp/host-costs
 *
 * Prints:
 * - a bare system call (getppid),
 * - a wake-up round trip between two threads (eventfd ping-pong; on one
 *   CPU under taskset that is two sleeps and two wake-ups),
 * - the sender's CPU per 250-byte loopback datagram to 32 sockets, one
 *   sendto each against one sendmmsg per 32 (what batching sends across
 *   connections could save).
 * Linux only; loopback only; bounded in count.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define SOCKETS 32
#define PAYLOAD 250

static double now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

static void syscall_cost(void) {
    const int n = 200000;
    double start = now_ns();
    for (int i = 0; i < n; i++)
        syscall(SYS_getppid);
    printf("system call (getppid): %.2f us\n", (now_ns() - start) / n / 1000);
}

static int ping_fd, pong_fd;
static const int ROUND_TRIPS = 50000;

static void *ponger(void *arg) {
    (void)arg;
    uint64_t v;
    for (int i = 0; i < ROUND_TRIPS; i++) {
        if (read(ping_fd, &v, 8) != 8)
            break;
        v = 1;
        if (write(pong_fd, &v, 8) != 8)
            break;
    }
    return NULL;
}

static void wakeup_cost(void) {
    ping_fd = eventfd(0, 0);
    pong_fd = eventfd(0, 0);
    pthread_t t;
    pthread_create(&t, NULL, ponger, NULL);
    uint64_t v = 1;
    double start = now_ns();
    for (int i = 0; i < ROUND_TRIPS; i++) {
        v = 1;
        if (write(ping_fd, &v, 8) != 8 || read(pong_fd, &v, 8) != 8)
            break;
    }
    double us = (now_ns() - start) / ROUND_TRIPS / 1000;
    pthread_join(t, NULL);
    printf("wake-up round trip between two threads (eventfd): %.2f us\n", us);
}

static void send_cost(void) {
    int rx[SOCKETS];
    struct sockaddr_in addr[SOCKETS];
    for (int i = 0; i < SOCKETS; i++) {
        rx[i] = socket(AF_INET, SOCK_DGRAM, 0);
        struct sockaddr_in a = {.sin_family = AF_INET};
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        bind(rx[i], (struct sockaddr *)&a, sizeof a);
        socklen_t len = sizeof a;
        getsockname(rx[i], (struct sockaddr *)&a, &len);
        addr[i] = a;
        int buf = 8 << 20;
        setsockopt(rx[i], SOL_SOCKET, SO_RCVBUF, &buf, sizeof buf);
    }
    int tx = socket(AF_INET, SOCK_DGRAM, 0);
    char payload[PAYLOAD], drain[2048];
    memset(payload, 1, sizeof payload);
    struct mmsghdr msgs[SOCKETS];
    struct iovec iov[SOCKETS];
    for (int i = 0; i < SOCKETS; i++) {
        iov[i] = (struct iovec){.iov_base = payload, .iov_len = PAYLOAD};
        memset(&msgs[i], 0, sizeof msgs[i]);
        msgs[i].msg_hdr.msg_name = &addr[i];
        msgs[i].msg_hdr.msg_namelen = sizeof addr[i];
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    const int rounds = 20000;
    for (int batched = 0; batched < 2; batched++) {
        double sending = 0;
        for (int r = 0; r < rounds; r++) {
            double start = now_ns();
            if (batched)
                sendmmsg(tx, msgs, SOCKETS, 0);
            else
                for (int i = 0; i < SOCKETS; i++)
                    sendto(tx, payload, PAYLOAD, 0, (struct sockaddr *)&addr[i],
                           sizeof addr[i]);
            sending += now_ns() - start;
            /* Empty the receivers now and then (not timed). */
            if (r % 64 == 63)
                for (int i = 0; i < SOCKETS; i++)
                    while (recv(rx[i], drain, sizeof drain, MSG_DONTWAIT) > 0) {
                    }
        }
        printf("%d-byte loopback datagram, %s: %.2f us of sender CPU each\n", PAYLOAD,
               batched ? "one sendmmsg per 32" : "one sendto each",
               sending / rounds / SOCKETS / 1000);
    }
}

int main(void) {
    syscall_cost();
    wakeup_cost();
    send_cost();
    return 0;
}
