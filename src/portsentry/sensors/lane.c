/* The fast lane: a lone TCP stealth probe's detection line and KILL_ROUTE, in C, on a thread of its
 * own (issue 11, item 3: the classic path at least as fast as 1.2).
 *
 * The daemon (service.lane) compiles what its engine, guards and ignore list would decide for a
 * fresh source into the tables below, as it compiles the kernel's first-probe rules. This thread
 * reads the capture socket; for a packet the tables decide completely (a SYN, FIN, NULL or XMAS
 * probe, as 1.2 names them, over IPv4 or IPv6 without options or extension headers, to a watched
 * port with no socket that would take it, from a source no table names and the daemon holds
 * nothing about, within the ban-rate allowance, with nothing else of the daemon's still unread)
 * it writes the detection line to syslog, takes a line of its record file for the ban, starts
 * KILL_ROUTE through /bin/sh and reports what it did. Every
 * other packet goes to the daemon unchanged, which decides it as before; so does every packet
 * while the lane is off. The daemon replays each report through its engine, which stays the
 * authority (records, hosts.deny, KILL_RUN_CMD, events, lifts).
 *
 * Channel messages (SOCK_SEQPACKET, one per datagram), all host byte order:
 *   'P' u8 pad[3] u32 seq, then the packet            a packet for the daemon
 *   'A' struct act                                     what the lane did for one probe
 * Loaded with ctypes: no Python API is used, so the thread never needs the interpreter's lock. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <linux/if_packet.h>
#include <linux/inet_diag.h>
#include <linux/netlink.h>
#include <linux/sock_diag.h>
#include <netinet/in.h>

extern char **environ;

#define MODE_NONE 0
#define ROUTE_MAX 4096
#define LINE_MAX_ 1024
/* The record file: RECORD_SLOTS lines of RECORD_SLOT bytes; a ban the lane began takes a free
 * (zeroed) one, space-padded text, until the daemon has its ban in the store and zeroes the line
 * (service.lane: a pwrite, so also after this lane is gone). Written through a shared mapping:
 * a store to memory, not a write(2) of 10-40 us on the way to KILL_ROUTE. As durable as that
 * write: both are in the page cache, which outlives the process (not a power cut; nor is the ban
 * store's commit, WAL without fsync). Blocks end in any order, so lines are freed in any order. */
#define RECORD_SLOT 128
#define RECORD_SLOTS 512

struct act {              /* the 'A' message */
    uint8_t type;         /* 'A' */
    uint8_t family;       /* 4 or 6 */
    uint8_t mode;         /* the port table's mode code */
    uint8_t sent;         /* 1: the detection line reached syslog */
    uint32_t seq;
    uint16_t port;
    uint16_t source_port;
    int32_t pid;          /* KILL_ROUTE's shell, or -1 */
    int32_t pipe;         /* read end of its output, or -1; the daemon owns it now */
    int32_t spawn_errno;  /* why the shell did not start (0: it did, or no KILL_ROUTE) */
    int32_t record_errno; /* why the record was not written (0: written) */
    int32_t line;         /* its line in the record file, or -1 (not written: see record_errno) */
    double at;            /* CLOCK_REALTIME of the decision */
    double started;       /* CLOCK_MONOTONIC when the shell was started */
    uint8_t source[16];   /* IPv4 in the first 4 bytes */
    uint8_t destination[16];
    uint8_t kind;         /* KIND_SYN .. KIND_XMAS */
    uint8_t pad[7];
};

_Static_assert(sizeof(struct act) == 88, "sensors/lane.py ACT reads 88 bytes");

/* The probe kinds the lane takes, with 1.2's words for them (core.probe KIND_*); the letter is
 * the kind's field in the record file. Any other flag set (ACK or RST: part of a connection;
 * "Unknown Type" mixes such as SYN+FIN) goes to the daemon. */
enum { KIND_SYN = 1, KIND_FIN, KIND_NULL, KIND_XMAS };
static const char *KIND_TEXT[] = {"", "TCP SYN/Normal scan", "TCP FIN scan", "TCP NULL scan",
                                  "TCP XMAS scan"};
static const char KIND_LETTER[] = " SFNX";

/* sensors.packet._classify for the six flag bits (ECE and CWR ignored, as in 1.2), 0: hand on. */
static int probe_kind(uint8_t flags) {
    enum { FIN = 0x01, SYN = 0x02, RST = 0x04, PSH = 0x08, ACK = 0x10, URG = 0x20 };
    if (flags & (ACK | RST)) return 0;
    uint8_t scan = flags & (SYN | FIN | PSH | URG);
    if (!scan) return KIND_NULL;
    if ((scan & (FIN | URG | PSH)) == (FIN | URG | PSH)) return KIND_XMAS;
    if (scan == FIN) return KIND_FIN;
    if (scan == SYN) return KIND_SYN;
    return 0;
}

struct pinset {           /* open addressing, 16-byte keys (IPv4 mapped into ::ffff:0:0/96) */
    uint8_t (*keys)[16];
    uint8_t *used;        /* 0 empty, 1 in use, 2 deleted */
    size_t capacity, count, deleted;
};

/* Packets of known sources (pinned: banned, or being banned) waiting to go to the daemon in one
 * message: in a flood from a banned host each was a wake-up of the main loop, about as much CPU
 * as the daemon's own work on it. They wait at most COALESCE_MS, and never behind anything else:
 * whatever else goes to the daemon sends them first, so the order holds. The daemon's handling
 * of such a packet concerns its source alone, so they do not keep the lane from acting. */
#define COALESCE_MS 2
#define BATCH_BYTES 65536
#define BATCH_PACKETS 256

struct batch { uint8_t data[BATCH_BYTES]; size_t used; uint32_t count; };

struct lane {
    pthread_mutex_t lock;
    pthread_t thread;
    int running;
    int capture, channel, stop_read, stop_write, diag, syslog_fd;
    char *record;                       /* the record file, mapped: RECORD_SLOTS lines */
    size_t record_cursor;               /* where the search for a free line starts */
    int enabled;
    uint32_t seq, deferred, processed;   /* last seq; last seq deferred; last seq the daemon handled */
    uint64_t acted, allowance;          /* bans made by the lane; it may make bans while acted < allowance */
    uint32_t inflight, inflight_cap;    /* shells started and not yet reaped by the daemon */
    uint8_t ports[65536];
    uint8_t (*local)[16]; size_t nlocal;
    uint8_t (*deny)[2][16]; size_t ndeny;  /* sorted, disjoint [first, last] ranges */
    struct pinset pins;
    char syslog_path[108];
    char prefix[128];                   /* "<29>" */
    char ident[128];                    /* " portsentry[123]: " */
    char route[ROUTE_MAX];              /* KILL_ROUTE's template; empty: none */
    char ignore_path[4096];             /* stat'ed per probe, as the daemon does */
    uint64_t ignore_key[4]; int ignore_present;  /* the daemon's list was read from this file */
    uint64_t errors;                    /* failures the daemon reads in status */
    struct batch batch;                 /* the lane thread's packets of known sources */
};

/* -- keys and tables ------------------------------------------------------------------------ */

static void key4(uint8_t key[16], const uint8_t *address) {
    memset(key, 0, 10); key[10] = 0xff; key[11] = 0xff; memcpy(key + 12, address, 4);
}

/* The murmur3 finalizer: every input bit reaches the low bits the table indexes with (a plain
 * multiply left the last octet of an IPv4 key out of them: a /24 of bans in one chain, and a
 * million pins took 13 s). Seeded per process, so nobody can choose sources that collide. */
static uint64_t mix64(uint64_t x) {
    x ^= x >> 33; x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ULL;
    return x ^ (x >> 33);
}

static uint64_t hash_seed;

static uint64_t hash16(const uint8_t key[16]) {
    uint64_t a, b; memcpy(&a, key, 8); memcpy(&b, key + 8, 8);
    return mix64(a ^ mix64(b ^ hash_seed));
}

static int pins_grow(struct pinset *set, size_t capacity) {
    uint8_t (*keys)[16] = calloc(capacity, 16);
    uint8_t *used = calloc(capacity, 1);
    if (!keys || !used) { free(keys); free(used); return -1; }
    for (size_t i = 0; i < set->capacity; i++) {
        if (set->used[i] != 1) continue;
        size_t j = hash16(set->keys[i]) & (capacity - 1);
        while (used[j]) j = (j + 1) & (capacity - 1);
        memcpy(keys[j], set->keys[i], 16); used[j] = 1;
    }
    free(set->keys); free(set->used);
    set->keys = keys; set->used = used; set->capacity = capacity; set->deleted = 0;
    return 0;
}

static long pins_find(const struct pinset *set, const uint8_t key[16]) {
    if (!set->capacity) return -1;
    size_t mask = set->capacity - 1, i = hash16(key) & mask;
    while (set->used[i]) {
        if (set->used[i] == 1 && memcmp(set->keys[i], key, 16) == 0) return (long)i;
        i = (i + 1) & mask;
    }
    return -1;
}

static int pins_add(struct pinset *set, const uint8_t key[16]) {
    if (pins_find(set, key) >= 0) return 0;
    if ((set->count + set->deleted + 1) * 4 > set->capacity * 3  /* at most 3/4 full */
        && pins_grow(set, set->capacity ? (set->count * 4 > set->capacity ? set->capacity * 2 : set->capacity) : 1024))
        return -1;
    size_t mask = set->capacity - 1, i = hash16(key) & mask;
    while (set->used[i] == 1) i = (i + 1) & mask;
    if (set->used[i] == 2) set->deleted--;
    memcpy(set->keys[i], key, 16); set->used[i] = 1; set->count++;
    return 0;
}

static void pins_remove(struct pinset *set, const uint8_t key[16]) {
    long i = pins_find(set, key);
    if (i < 0) return;
    set->used[i] = 2; set->count--; set->deleted++;
}

static int denied(const struct lane *lane, const uint8_t key[16]) {
    size_t lo = 0, hi = lane->ndeny;
    while (lo < hi) {  /* the first range whose last address is >= key */
        size_t mid = (lo + hi) / 2;
        if (memcmp(lane->deny[mid][1], key, 16) < 0) lo = mid + 1; else hi = mid;
    }
    return lo < lane->ndeny && memcmp(lane->deny[lo][0], key, 16) <= 0;
}

static int is_local(const struct lane *lane, const uint8_t key[16]) {
    for (size_t i = 0; i < lane->nlocal; i++)
        if (memcmp(lane->local[i], key, 16) == 0) return 1;
    return 0;
}

/* -- the checks that ask the kernel --------------------------------------------------------- */

/* Would a socket here take this probe (the kernel's own lookup, as the daemon's SockDiag.takes)?
 * 1 yes, 0 no, -1 the kernel cannot say (the daemon decides then). */
static int taken(struct lane *lane, int family, const uint8_t *src, const uint8_t *dst,
                 uint16_t sport, uint16_t dport) {
    struct { struct nlmsghdr h; struct inet_diag_req_v2 r; } req;
    memset(&req, 0, sizeof req);
    static uint32_t seq;
    req.h.nlmsg_len = sizeof req; req.h.nlmsg_type = SOCK_DIAG_BY_FAMILY;
    req.h.nlmsg_flags = NLM_F_REQUEST; req.h.nlmsg_seq = ++seq;
    req.r.sdiag_family = family == 4 ? AF_INET : AF_INET6;
    req.r.sdiag_protocol = IPPROTO_TCP; req.r.idiag_states = 0xFFFFFFFF;
    req.r.id.idiag_sport = htons(dport); req.r.id.idiag_dport = htons(sport);
    memcpy(req.r.id.idiag_src, dst, family == 4 ? 4 : 16);
    memcpy(req.r.id.idiag_dst, src, family == 4 ? 4 : 16);
    req.r.id.idiag_cookie[0] = req.r.id.idiag_cookie[1] = 0xFFFFFFFF;
    if (send(lane->diag, &req, sizeof req, 0) != (ssize_t)sizeof req) return -1;
    for (;;) {
        char buf[8192];
        ssize_t n = recv(lane->diag, buf, sizeof buf, 0);
        if (n < (ssize_t)sizeof(struct nlmsghdr)) return -1;
        for (struct nlmsghdr *h = (struct nlmsghdr *)buf; NLMSG_OK(h, (size_t)n); h = NLMSG_NEXT(h, n)) {
            if (h->nlmsg_seq != seq) continue;
            if (h->nlmsg_type == SOCK_DIAG_BY_FAMILY) return 1;
            if (h->nlmsg_type == NLMSG_ERROR) {
                struct nlmsgerr *e = NLMSG_DATA(h);
                return e->error == -ENOENT ? 0 : -1;
            }
            return -1;
        }
    }
}

static int ignore_unchanged(struct lane *lane) {
    if (!lane->ignore_path[0]) return 1;
    /* As config.ignore's IgnoreSource: a file it cannot stat leaves the list in force; one whose
     * (dev, ino, size, mtime) differs from what the list was read from is the daemon's to read. */
    struct stat now;
    if (stat(lane->ignore_path, &now) != 0) return !lane->ignore_present;
    uint64_t mtime = (uint64_t)now.st_mtim.tv_sec * 1000000000ULL + (uint64_t)now.st_mtim.tv_nsec;
    return lane->ignore_present && (uint64_t)now.st_dev == lane->ignore_key[0]
        && (uint64_t)now.st_ino == lane->ignore_key[1] && (uint64_t)now.st_size == lane->ignore_key[2]
        && mtime == lane->ignore_key[3];
}

/* -- what the lane does ---------------------------------------------------------------------- */

static const char *MODES[] = {"", "stcp", "atcp"};

/* KILL_ROUTE with $TARGET$, then $PORT$, then $MODE$ replaced, as responders.substitute does
 * (one pass per token over the previous pass's result). -1 when it does not fit. */
static int render(const char *template, const char *target, unsigned port, int mode, char *out, size_t size) {
    char port_text[8]; snprintf(port_text, sizeof port_text, "%u", port);
    const char *tokens[3] = {"$TARGET$", "$PORT$", "$MODE$"};
    const char *values[3] = {target, port_text, mode > 0 && mode < 3 ? MODES[mode] : ""};
    char a[ROUTE_MAX * 2], b[ROUTE_MAX * 2];
    if (strlen(template) >= sizeof a) return -1;
    strcpy(a, template);
    char *from = a, *to = b;
    for (int t = 0; t < 3; t++) {
        size_t tl = strlen(tokens[t]), vl = strlen(values[t]), used = 0;
        const char *p = from;
        for (;;) {
            const char *hit = strstr(p, tokens[t]);
            size_t chunk = hit ? (size_t)(hit - p) : strlen(p);
            if (used + chunk + (hit ? vl : 0) + 1 > sizeof a) return -1;
            memcpy(to + used, p, chunk); used += chunk;
            if (!hit) break;
            memcpy(to + used, values[t], vl); used += vl;
            p = hit + tl;
        }
        to[used] = 0;
        char *swap = from; from = to; to = swap;
    }
    if (strlen(from) + 1 > size) return -1;
    strcpy(out, from);
    return 0;
}

static int reconnect_syslog(struct lane *lane) {
    if (lane->syslog_fd >= 0) close(lane->syslog_fd);
    lane->syslog_fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (lane->syslog_fd < 0) return -1;
    struct sockaddr_un address = {.sun_family = AF_UNIX};
    memcpy(address.sun_path, lane->syslog_path, strlen(lane->syslog_path) + 1);  /* length checked when set */
    if (connect(lane->syslog_fd, (struct sockaddr *)&address, sizeof address) != 0) {
        close(lane->syslog_fd); lane->syslog_fd = -1; return -1;
    }
    return 0;
}

static int send_line(struct lane *lane, const char *message, time_t second) {
    struct tm tm; char stamp[32], line[LINE_MAX_];
    localtime_r(&second, &tm);
    strftime(stamp, sizeof stamp, "%b %e %H:%M:%S", &tm);
    int n = snprintf(line, sizeof line, "%s%s%s%s", lane->prefix, stamp, lane->ident, message);
    if (n <= 0 || (size_t)n >= sizeof line) return 0;
    for (int attempt = 0; attempt < 2; attempt++) {
        if (lane->syslog_fd < 0 && reconnect_syslog(lane) != 0) return 0;
        if (send(lane->syslog_fd, line, (size_t)n, MSG_DONTWAIT | MSG_NOSIGNAL) == n) return 1;
        if (errno == EAGAIN) return 0;  /* the log daemon is behind: the daemon's writer holds it */
        close(lane->syslog_fd); lane->syslog_fd = -1;
    }
    return 0;
}

/* The shell as responders.shell starts it: its own session, stdin /dev/null, stdout and stderr
 * into a pipe whose read end the daemon takes, SIGPIPE and SIGXFSZ (which Python ignores, and an
 * ignored signal stays ignored across exec) back to their defaults, no signal blocked. vfork, not
 * posix_spawn: glibc's POSIX_SPAWN_SETSIGDEF resets all 64 signals in the child one call at a
 * time, a tenth of a millisecond on the way to KILL_ROUTE; only those two need it (handlers are
 * reset by exec itself). The child calls async-signal-safe functions only. */
static void spawn_route(struct lane *lane, const char *command, struct act *act) {
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0) { act->spawn_errno = errno; return; }
    if (fds[0] <= 2 || fds[1] <= 2) {
        /* Someone started us with 0-2 closed: dup2 onto itself would keep close-on-exec. The
         * daemon's own runner copes with that (responders.shell); it runs KILL_ROUTE then. */
        close(fds[0]); close(fds[1]); act->spawn_errno = EBADF; return;
    }
    char *argv[] = {"/bin/sh", "-c", (char *)command, NULL};
    struct timespec now; clock_gettime(CLOCK_MONOTONIC, &now);
    act->started = (double)now.tv_sec + (double)now.tv_nsec / 1e9;
    volatile int child_errno = 0;
    pid_t pid = vfork();
    if (pid == 0) {
        sigset_t none; sigemptyset(&none);
        struct sigaction fallback; memset(&fallback, 0, sizeof fallback); fallback.sa_handler = SIG_DFL;
        int null = open("/dev/null", O_RDONLY);
        if (setsid() < 0 || null < 0 || dup2(null, 0) < 0 || dup2(fds[1], 1) < 0 || dup2(fds[1], 2) < 0
            || sigaction(SIGPIPE, &fallback, NULL) < 0 || sigaction(SIGXFSZ, &fallback, NULL) < 0
            || sigprocmask(SIG_SETMASK, &none, NULL) < 0) {
            child_errno = errno; _exit(127);
        }
        if (null > 2) close(null);
        execve("/bin/sh", argv, environ);
        child_errno = errno;
        _exit(127);
    }
    int fork_errno = errno;
    close(fds[1]);
    if (pid < 0) { close(fds[0]); act->spawn_errno = fork_errno; return; }
    if (child_errno) {  /* the child shares our memory until exec: it said why it could not */
        int status; waitpid(pid, &status, 0);
        close(fds[0]); act->spawn_errno = child_errno; return;
    }
    act->pid = pid; act->pipe = fds[0];
    lane->inflight++;
}

/* One message to the daemon. A full channel (the main loop is behind) is waited for: its reader
 * keeps reading until the thread has ended when it stops it (LaneCapture.stop, lane_stopped), so
 * nothing the lane took is dropped. */
static void send_all(struct lane *lane, const void *head, size_t head_size, const void *body, size_t body_size) {
    struct iovec parts[2] = {{(void *)head, head_size}, {(void *)body, body_size}};
    struct msghdr message = {.msg_iov = parts, .msg_iovlen = body_size ? 2 : 1};
    while (sendmsg(lane->channel, &message, MSG_NOSIGNAL) < 0) {
        if (errno != EINTR) { lane->errors++; return; }  /* the reader is gone: nobody to tell */
    }
}

/* The lane's decision for one packet: 1 when it acted (its report in `report`, for the caller to
 * send), 0 to hand it on. Called with the lock held. */
static int decide(struct lane *lane, const uint8_t *packet, size_t size, const struct sockaddr_ll *from,
                  struct act *report) {
    /* Nothing acts while a packet handed on is still undecided: the daemon may be about to hold
     * something about its source that the tables do not say yet. */
    if (!lane->enabled || from->sll_pkttype == PACKET_OUTGOING || (int32_t)(lane->deferred - lane->processed) > 0)
        return 0;
    struct act act; memset(&act, 0, sizeof act);
    const uint8_t *tcp; size_t tcp_room; uint8_t key[16], dkey[16];
    if (size >= 20 && packet[0] == 0x45) {
        unsigned total = (unsigned)(packet[2] << 8 | packet[3]);
        if (packet[9] != IPPROTO_TCP || (packet[6] & 0x3F) || packet[7] || total < 40) return 0;
        act.family = 4;
        memcpy(act.source, packet + 12, 4); memcpy(act.destination, packet + 16, 4);
        key4(key, packet + 12); key4(dkey, packet + 16);
        tcp = packet + 20; tcp_room = (total < size ? total : size) - 20;
        if (total - 20 < 20) return 0;
    } else if (size >= 40 && packet[0] >> 4 == 6) {
        unsigned payload = (unsigned)(packet[4] << 8 | packet[5]);
        if (packet[6] != IPPROTO_TCP || payload < 20) return 0;
        act.family = 6;
        memcpy(act.source, packet + 8, 16); memcpy(act.destination, packet + 24, 16);
        memcpy(key, packet + 8, 16); memcpy(dkey, packet + 24, 16);
        static const uint8_t zeros[10];
        if (memcmp(key, zeros, 10) == 0) return 0;  /* ::/80: IPv4-mapped, -compatible, ::1 */
        /* A destination there is the daemon's IPv4 address to the daemon (addresses.canonical),
         * and its key an IPv4 key here: acted on, the report named ::ffff:a.b.c.d. */
        if (memcmp(dkey, zeros, 10) == 0) return 0;
        tcp = packet + 40; tcp_room = (40 + payload < size ? 40 + payload : size) - 40;
    } else {
        return 0;
    }
    if (tcp_room < 20 || (tcp[12] >> 4) < 5) return 0;
    if (!(act.kind = (uint8_t)probe_kind(tcp[13] & 0x3F))) return 0;
    if (act.family == 4 ? (tcp[12] >> 4) * 4u > (unsigned)(packet[2] << 8 | packet[3]) - 20u
                        : (tcp[12] >> 4) * 4u > (unsigned)(packet[4] << 8 | packet[5])) return 0;
    act.port = (uint16_t)(tcp[2] << 8 | tcp[3]);
    act.source_port = (uint16_t)(tcp[0] << 8 | tcp[1]);
    act.mode = lane->ports[act.port];
    if (act.mode == MODE_NONE || !is_local(lane, dkey) || denied(lane, key) || pins_find(&lane->pins, key) >= 0)
        return 0;
    if (lane->acted >= lane->allowance || lane->inflight >= lane->inflight_cap) return 0;
    if (!ignore_unchanged(lane)) return 0;
    if (taken(lane, act.family, act.source, act.destination, act.source_port, act.port) != 0) return 0;

    /* Acting: the line, the record, the command, in the daemon's order. */
    struct timespec now; clock_gettime(CLOCK_REALTIME, &now);
    act.type = 'A'; act.seq = ++lane->seq; act.pid = -1; act.pipe = -1;
    act.at = (double)now.tv_sec + (double)now.tv_nsec / 1e9;
    char text[INET6_ADDRSTRLEN], message[512];
    inet_ntop(act.family == 4 ? AF_INET : AF_INET6, act.source, text, sizeof text);
    snprintf(message, sizeof message, "attackalert: %s from host: %s/%s to TCP port: %u",
             KIND_TEXT[act.kind], text, text, act.port);
    act.sent = (uint8_t)send_line(lane, message, now.tv_sec);
    act.line = -1;
    char *slot = NULL;
    if (!lane->record) act.record_errno = EBADF;
    else {
        for (size_t k = 0; k < RECORD_SLOTS && !slot; k++) {
            size_t i = (lane->record_cursor + k) % RECORD_SLOTS;
            if (!lane->record[i * RECORD_SLOT]) { slot = lane->record + i * RECORD_SLOT; act.line = (int32_t)i; }
        }
        if (!slot) act.record_errno = ENOSPC;  /* RECORD_SLOTS bans not in the store yet */
    }
    if (slot) {
        char text_line[RECORD_SLOT + 64];
        int n = snprintf(text_line, sizeof text_line, "%u %ld.%06ld %s %u %s %c", act.seq, (long)now.tv_sec,
                         now.tv_nsec / 1000, text, act.port, MODES[act.mode], KIND_LETTER[act.kind]);
        /* 81 characters at most */
        if (n <= 0 || n >= RECORD_SLOT - 1) { act.record_errno = ENAMETOOLONG; act.line = -1; }
        else {
            memcpy(slot + 1, text_line + 1, (size_t)n - 1);
            memset(slot + n, ' ', RECORD_SLOT - 1 - (size_t)n);
            slot[RECORD_SLOT - 1] = '\n';
            slot[0] = text_line[0];  /* last: a line is taken once its first byte is */
            lane->record_cursor = (size_t)act.line + 1;
        }
    }
    if (lane->route[0] && !act.record_errno) {
        char command[ROUTE_MAX];
        if (render(lane->route, text, act.port, act.mode, command, sizeof command) == 0)
            spawn_route(lane, command, &act);
        else
            act.spawn_errno = ENAMETOOLONG;
    }
    if (pins_add(&lane->pins, key) != 0) {
        lane->enabled = 0;  /* it could not remember this source: it must not act again */
        lane->errors++;
    }
    lane->acted++;
    *report = act;
    return 1;
}

/* The source's key of an IPv4 or IPv6 packet (0: too short to say). */
static int source_key(const uint8_t *packet, size_t size, uint8_t key[16]) {
    if (size >= 20 && packet[0] >> 4 == 4) { key4(key, packet + 12); return 1; }
    if (size >= 40 && packet[0] >> 4 == 6) { memcpy(key, packet + 8, 16); return 1; }
    return 0;
}

static void flush(struct lane *lane, struct batch *batch) {
    if (!batch->count) return;
    uint8_t head[8] = {'M', 0, 0, 0};
    memcpy(head + 4, &batch->count, 4);
    send_all(lane, head, sizeof head, batch->data, batch->used);
    batch->used = 0; batch->count = 0;
}

static void add(struct lane *lane, struct batch *batch, uint32_t seq, const uint8_t *packet, size_t size) {
    if (batch->used + 8 + size > BATCH_BYTES || batch->count == BATCH_PACKETS) flush(lane, batch);
    uint8_t *entry = batch->data + batch->used;
    uint16_t length = (uint16_t)size, pad = 0;
    memcpy(entry, &seq, 4); memcpy(entry + 4, &length, 2); memcpy(entry + 6, &pad, 2);
    memcpy(entry + 8, packet, size);
    batch->used += 8 + size; batch->count++;
}

static void *run(void *arg) {
    struct lane *lane = arg;
    /* Signals are the interpreter's (its handlers run on any thread that takes them): none here.
     * So a shell's vfork child starts with all of them blocked, sets up its session first and
     * unblocks only then, when nothing but us knows its pid: no handler of the daemon's can run
     * in it before exec resets them. */
    sigset_t all; sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
    uint8_t packet[2048];
    struct batch *pending = &lane->batch;  /* 64 KiB: not on the thread's stack */
    pending->used = 0; pending->count = 0;
    struct pollfd fds[2] = {{lane->capture, POLLIN, 0}, {lane->stop_read, POLLIN, 0}};
    for (;;) {
        int ready = poll(fds, 2, pending->count ? COALESCE_MS : -1);
        if (ready < 0) { if (errno == EINTR) continue; break; }
        if (fds[1].revents) break;
        if (ready == 0) { flush(lane, pending); continue; }
        for (int round = 0; round < 256; round++) {
            /* Zeroed: a capture that names no sender (the unit tests' socket pair) then reads
             * as PACKET_HOST, not as whatever the stack held. */
            struct sockaddr_ll from = {0}; socklen_t length = sizeof from;
            ssize_t n = recvfrom(lane->capture, packet, sizeof packet, MSG_DONTWAIT, (struct sockaddr *)&from, &length);
            if (n < 0) break;
            struct act act; uint8_t head[8] = {'P', 0, 0, 0}, key[16];
            uint32_t seq = 0;
            pthread_mutex_lock(&lane->lock);
            int known = lane->pins.count && source_key(packet, (size_t)n, key) && pins_find(&lane->pins, key) >= 0;
            int acted = !known && decide(lane, packet, (size_t)n, &from, &act);
            if (!acted) {
                seq = ++lane->seq; memcpy(head + 4, &seq, 4);
                if (!known) lane->deferred = seq;
            }
            pthread_mutex_unlock(&lane->lock);
            /* Sent without the lock: the send waits while the channel is full, and the daemon,
             * the one reader, takes the lock for its every call (processed, allow, pin); held
             * here, a burst the daemon was slow to read stopped both for good. Only this thread
             * sends, so messages still go in seq order. */
            if (known) { add(lane, pending, seq, packet, (size_t)n); continue; }
            flush(lane, pending);
            if (acted) send_all(lane, &act, sizeof act, NULL, 0);
            else send_all(lane, head, sizeof head, packet, (size_t)n);
        }
    }
    flush(lane, pending);  /* the stop: the daemon reads until this thread has ended */
    return NULL;
}

/* -- the daemon's side (ctypes) ------------------------------------------------------------- */

struct lane *lane_new(void) {
    struct lane *lane = calloc(1, sizeof *lane);
    if (!lane) return NULL;
    if (!hash_seed && getrandom(&hash_seed, sizeof hash_seed, 0) != sizeof hash_seed)
        hash_seed = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
    pthread_mutex_init(&lane->lock, NULL);
    lane->capture = lane->channel = lane->stop_read = lane->stop_write = lane->syslog_fd = -1;
    lane->diag = socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
    lane->inflight_cap = 8;
    if (lane->diag < 0) { free(lane); return NULL; }
    return lane;
}

int lane_start(struct lane *lane, int capture, int channel) {
    int fds[2];
    if (lane->running || pipe2(fds, O_CLOEXEC) != 0) return -1;
    lane->capture = capture; lane->channel = channel;
    lane->stop_read = fds[0]; lane->stop_write = fds[1];
    if (pthread_create(&lane->thread, NULL, run, lane) != 0) {
        close(fds[0]); close(fds[1]); return -1;
    }
    lane->running = 1;
    return 0;
}

/* The thread stops after the batch it is in; until then it may wait for room on the channel, so
 * whoever reads the channel keeps reading until lane_stopped() says it has ended. */
void lane_stop_request(struct lane *lane) {
    if (!lane->running) return;
    ssize_t ignored = write(lane->stop_write, "x", 1); (void)ignored;
}

static void ended(struct lane *lane) {
    close(lane->stop_read); close(lane->stop_write);
    lane->running = 0;
}

/* 1 when the thread has ended (joined now), 0 while it runs. */
int lane_stopped(struct lane *lane) {
    if (!lane->running) return 1;
    if (pthread_tryjoin_np(lane->thread, NULL) != 0) return 0;
    ended(lane);
    return 1;
}

/* Waits for the thread: only for a caller that is not the channel's reader, or whose channel has
 * room (the thread may be waiting to send). */
void lane_stop(struct lane *lane) {
    if (!lane->running) return;
    lane_stop_request(lane);
    pthread_join(lane->thread, NULL);
    ended(lane);
}

static void unmap_record(struct lane *lane);

void lane_free(struct lane *lane) {
    lane_stop(lane);
    unmap_record(lane);
    close(lane->diag);
    if (lane->syslog_fd >= 0) close(lane->syslog_fd);
    free(lane->local); free(lane->deny); free(lane->pins.keys); free(lane->pins.used);
    pthread_mutex_destroy(&lane->lock);
    free(lane);
}

void lane_enable(struct lane *lane, int on) {
    pthread_mutex_lock(&lane->lock); lane->enabled = on; pthread_mutex_unlock(&lane->lock);
}

int lane_set_syslog(struct lane *lane, const char *path, const char *prefix, const char *ident) {
    if (strlen(path) >= sizeof lane->syslog_path || strlen(prefix) >= sizeof lane->prefix
        || strlen(ident) >= sizeof lane->ident) return -1;
    pthread_mutex_lock(&lane->lock);
    strcpy(lane->syslog_path, path); strcpy(lane->prefix, prefix); strcpy(lane->ident, ident);
    if (lane->syslog_fd >= 0) { close(lane->syslog_fd); lane->syslog_fd = -1; }
    pthread_mutex_unlock(&lane->lock);
    return 0;
}

static void unmap_record(struct lane *lane) {
    if (lane->record) munmap(lane->record, RECORD_SLOT * RECORD_SLOTS);
    lane->record = NULL;
}

/* The record file (`fd`, opened read-write; -1: none, and the lane starts no command). 0, or
 * -1 and errno. */
int lane_set_record(struct lane *lane, int fd) {
    char *map = NULL;
    if (fd >= 0) {
        struct stat info;
        size_t size = RECORD_SLOT * RECORD_SLOTS;
        if (fstat(fd, &info) != 0 || ((size_t)info.st_size < size && ftruncate(fd, (off_t)size) != 0))
            return -1;
        map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (map == MAP_FAILED) return -1;
    }
    pthread_mutex_lock(&lane->lock);
    unmap_record(lane);
    lane->record = map; lane->record_cursor = 0;
    pthread_mutex_unlock(&lane->lock);
    return 0;
}

int lane_set_route(struct lane *lane, const char *template) {
    if (strlen(template) >= ROUTE_MAX) return -1;
    pthread_mutex_lock(&lane->lock); strcpy(lane->route, template); pthread_mutex_unlock(&lane->lock);
    return 0;
}

int lane_render(struct lane *lane, const char *target, unsigned port, int mode, char *out, size_t size) {
    return render(lane->route, target, port, mode, out, size);
}

void lane_set_ports(struct lane *lane, const uint8_t *ports) {
    pthread_mutex_lock(&lane->lock); memcpy(lane->ports, ports, 65536); pthread_mutex_unlock(&lane->lock);
}

static int copy_table(void **into, size_t *count, const uint8_t *data, size_t n, size_t item) {
    void *copy = n ? malloc(n * item) : NULL;
    if (n && !copy) return -1;
    if (n) memcpy(copy, data, n * item);
    free(*into); *into = copy; *count = n;
    return 0;
}

int lane_set_local(struct lane *lane, const uint8_t *keys, size_t n) {
    pthread_mutex_lock(&lane->lock);
    int result = copy_table((void **)&lane->local, &lane->nlocal, keys, n, 16);
    pthread_mutex_unlock(&lane->lock);
    return result;
}

int lane_set_deny(struct lane *lane, const uint8_t *ranges, size_t n) {
    pthread_mutex_lock(&lane->lock);
    int result = copy_table((void **)&lane->deny, &lane->ndeny, ranges, n, 32);
    pthread_mutex_unlock(&lane->lock);
    return result;
}

/* `key` (dev, ino, size, mtime_ns) of the file the daemon's list in force was read from, or NULL
 * when it could not stat it. */
int lane_set_ignore(struct lane *lane, const char *path, const uint64_t *key) {
    if (strlen(path) >= sizeof lane->ignore_path) return -1;
    pthread_mutex_lock(&lane->lock);
    strcpy(lane->ignore_path, path);
    lane->ignore_present = key != NULL;
    if (key) memcpy(lane->ignore_key, key, sizeof lane->ignore_key);
    pthread_mutex_unlock(&lane->lock);
    return 0;
}

int lane_pin(struct lane *lane, const uint8_t *key) {
    pthread_mutex_lock(&lane->lock); int r = pins_add(&lane->pins, key); pthread_mutex_unlock(&lane->lock);
    return r;
}

int lane_pin_many(struct lane *lane, const uint8_t *keys, size_t n) {
    int r = 0;
    pthread_mutex_lock(&lane->lock);
    for (size_t i = 0; i < n && r == 0; i++) r = pins_add(&lane->pins, keys + 16 * i);
    pthread_mutex_unlock(&lane->lock);
    return r;
}

void lane_clear_pins(struct lane *lane) {
    pthread_mutex_lock(&lane->lock);
    free(lane->pins.keys); free(lane->pins.used); memset(&lane->pins, 0, sizeof lane->pins);
    pthread_mutex_unlock(&lane->lock);
}

void lane_unpin(struct lane *lane, const uint8_t *key) {
    pthread_mutex_lock(&lane->lock); pins_remove(&lane->pins, key); pthread_mutex_unlock(&lane->lock);
}

int lane_pinned(struct lane *lane, const uint8_t *key) {
    pthread_mutex_lock(&lane->lock); int r = pins_find(&lane->pins, key) >= 0; pthread_mutex_unlock(&lane->lock);
    return r;
}

/* The longest run of used slots (a probe never walks further): the hash's quality, for tests. */
size_t lane_pin_longest_run(struct lane *lane) {
    pthread_mutex_lock(&lane->lock);
    size_t longest = 0, run = 0;
    for (size_t i = 0; i < 2 * lane->pins.capacity; i++) {  /* twice round: a run may wrap */
        run = lane->pins.used[i % lane->pins.capacity] ? run + 1 : 0;
        if (run > longest) longest = run;
    }
    pthread_mutex_unlock(&lane->lock);
    return longest > lane->pins.capacity ? lane->pins.capacity : longest;
}

size_t lane_pin_count(struct lane *lane) {
    pthread_mutex_lock(&lane->lock); size_t n = lane->pins.count; pthread_mutex_unlock(&lane->lock);
    return n;
}

void lane_processed(struct lane *lane, uint32_t seq) {
    pthread_mutex_lock(&lane->lock); lane->processed = seq; pthread_mutex_unlock(&lane->lock);
}

/* The ban-rate allowance: the lane may make `free` bans beyond those the daemon has taken in. */
uint64_t lane_allow(struct lane *lane, uint64_t adopted, uint64_t free_bans) {
    pthread_mutex_lock(&lane->lock);
    lane->allowance = adopted + free_bans;
    uint64_t acted = lane->acted;
    pthread_mutex_unlock(&lane->lock);
    return acted;
}

/* A ban the daemon starts itself (a connect mode's) takes one of the lane's free bans at once,
 * so the two never share one free slot of the minute: 1 if one was left (it is now the
 * daemon's), 0 if the lane's bans in flight already took them all. */
int lane_claim(struct lane *lane) {
    pthread_mutex_lock(&lane->lock);
    int left = lane->acted < lane->allowance;
    if (left) lane->allowance--;
    pthread_mutex_unlock(&lane->lock);
    return left;
}

void lane_shell_done(struct lane *lane) {
    pthread_mutex_lock(&lane->lock); if (lane->inflight) lane->inflight--; pthread_mutex_unlock(&lane->lock);
}

uint64_t lane_errors(struct lane *lane) {
    pthread_mutex_lock(&lane->lock); uint64_t n = lane->errors; pthread_mutex_unlock(&lane->lock);
    return n;
}

void lane_set_shell_cap(struct lane *lane, uint32_t cap) {
    pthread_mutex_lock(&lane->lock); lane->inflight_cap = cap; pthread_mutex_unlock(&lane->lock);
}

