/* The fast lane: the common proxied request, in C.
 *
 * A client connection starts here. A request whose head and body arrived whole in the bytes
 * at hand, whose framing is plain (no Transfer-Encoding, Expect or Upgrade, at most one
 * Content-Length, a Host for HTTP/1.1, nothing a strict parser could read two ways) and whose
 * route the Python side declares lane-eligible is forwarded from here: the head is rewritten
 * the way gateway/headers.py does it, sent on a pooled upstream connection, and the answer is
 * relayed with back-pressure. The target is picked, and the outcome booked, by the Python side
 * (one call each), so balancing, breakers, outlier detection, metrics and the access log are
 * the same code as on the Python path.
 *
 * Anything else - a partial or unusual request, an ineligible route, an upstream failure
 * before the answer started - hands the connection over to the Python server protocol for
 * good, replaying the bytes not yet consumed (and, for a failed attempt, what happened to it).
 * The lane never answers an error itself. See docs/internals.md, "The fast lane".
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <string.h>
#include <stdint.h>
#include <time.h>

/* ---------------------------------------------------------------------------------------- */
/* small helpers                                                                             */

typedef struct {
    char *p;
    Py_ssize_t len, cap;
} Buf;

static int buf_reserve(Buf *b, Py_ssize_t extra) {
    if (b->len + extra <= b->cap) return 0;
    Py_ssize_t cap = b->cap ? b->cap : 2048;
    while (cap < b->len + extra) cap *= 2;
    char *p = PyMem_Realloc(b->p, cap);
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

static inline int buf_add(Buf *b, const char *d, Py_ssize_t n) {
    if (buf_reserve(b, n) < 0) return -1;
    memcpy(b->p + b->len, d, n);
    b->len += n;
    return 0;
}

#define BUF_LIT(b, s) buf_add((b), (s), (Py_ssize_t)(sizeof(s) - 1))

static inline void buf_consume(Buf *b, Py_ssize_t n) {
    if (n >= b->len) {
        b->len = 0;
        return;
    }
    memmove(b->p, b->p + n, b->len - n);
    b->len -= n;
}

static void buf_free(Buf *b) {
    PyMem_Free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

/* shrink a buffer that grew for one large message back to a small one */
static void buf_trim(Buf *b) {
    if (b->len == 0 && b->cap > 65536) buf_free(b);
}

static int buf_add_hex(Buf *b, size_t v) {
    char tmp[24];
    int n = snprintf(tmp, sizeof tmp, "%zx", v);
    return buf_add(b, tmp, n);
}

static int buf_add_dec(Buf *b, long long v) {
    char tmp[24];
    int n = snprintf(tmp, sizeof tmp, "%lld", v);
    return buf_add(b, tmp, n);
}

static inline unsigned char lower(unsigned char c);

/* `name: value\r\n` with the name lower-cased, as http1.server keeps names */
static int buf_add_field(Buf *b, const char *name, Py_ssize_t nl, const char *v, Py_ssize_t vl) {
    Py_ssize_t at = b->len;
    if (buf_add(b, name, nl) < 0) return -1;
    for (Py_ssize_t i = at; i < at + nl; i++) b->p[i] = (char)lower((unsigned char)b->p[i]);
    if (BUF_LIT(b, ": ") < 0 || buf_add(b, v, vl) < 0 || BUF_LIT(b, "\r\n") < 0) return -1;
    return 0;
}

static const unsigned char TCHAR[256] = {
    /* RFC 9110 token characters */
    ['!'] = 1, ['#'] = 1, ['$'] = 1, ['%'] = 1, ['&'] = 1, ['\''] = 1, ['*'] = 1, ['+'] = 1,
    ['-'] = 1, ['.'] = 1, ['^'] = 1, ['_'] = 1, ['`'] = 1, ['|'] = 1, ['~'] = 1,
    ['0'] = 1, ['1'] = 1, ['2'] = 1, ['3'] = 1, ['4'] = 1, ['5'] = 1, ['6'] = 1, ['7'] = 1,
    ['8'] = 1, ['9'] = 1,
    ['A'] = 1, ['B'] = 1, ['C'] = 1, ['D'] = 1, ['E'] = 1, ['F'] = 1, ['G'] = 1, ['H'] = 1,
    ['I'] = 1, ['J'] = 1, ['K'] = 1, ['L'] = 1, ['M'] = 1, ['N'] = 1, ['O'] = 1, ['P'] = 1,
    ['Q'] = 1, ['R'] = 1, ['S'] = 1, ['T'] = 1, ['U'] = 1, ['V'] = 1, ['W'] = 1, ['X'] = 1,
    ['Y'] = 1, ['Z'] = 1,
    ['a'] = 1, ['b'] = 1, ['c'] = 1, ['d'] = 1, ['e'] = 1, ['f'] = 1, ['g'] = 1, ['h'] = 1,
    ['i'] = 1, ['j'] = 1, ['k'] = 1, ['l'] = 1, ['m'] = 1, ['n'] = 1, ['o'] = 1, ['p'] = 1,
    ['q'] = 1, ['r'] = 1, ['s'] = 1, ['t'] = 1, ['u'] = 1, ['v'] = 1, ['w'] = 1, ['x'] = 1,
    ['y'] = 1, ['z'] = 1,
};

/* field-value bytes: HTAB, SP..~, obs-text */
static inline int vchar(unsigned char c) { return c == '\t' || (c >= 0x20 && c != 0x7f); }

static inline unsigned char lower(unsigned char c) {
    return (c >= 'A' && c <= 'Z') ? (unsigned char)(c + 32) : c;
}

static int ieq(const char *a, Py_ssize_t n, const char *lit) {
    Py_ssize_t m = (Py_ssize_t)strlen(lit);
    if (n != m) return 0;
    for (Py_ssize_t i = 0; i < n; i++)
        if (lower((unsigned char)a[i]) != (unsigned char)lit[i]) return 0;
    return 1;
}

/* Is `name` (lower-case, n bytes) one of the comma-separated tokens of a Connection value? */
static int conn_names(const char *v, Py_ssize_t vn, const char *name, Py_ssize_t n) {
    Py_ssize_t i = 0;
    while (i < vn) {
        while (i < vn && (v[i] == ' ' || v[i] == '\t' || v[i] == ',')) i++;
        Py_ssize_t s = i;
        while (i < vn && v[i] != ',') i++;
        Py_ssize_t e = i;
        while (e > s && (v[e - 1] == ' ' || v[e - 1] == '\t')) e--;
        if (e - s == n) {
            Py_ssize_t k = 0;
            while (k < n && lower((unsigned char)v[s + k]) == (unsigned char)name[k]) k++;
            if (k == n) return 1;
        }
    }
    return 0;
}

/* A Connection value naming only keep-alive and/or close (the usual ones). */
static int conn_plain(const char *v, Py_ssize_t vn) {
    Py_ssize_t i = 0;
    while (i < vn) {
        while (i < vn && (v[i] == ' ' || v[i] == '\t' || v[i] == ',')) i++;
        Py_ssize_t s = i;
        while (i < vn && v[i] != ',') i++;
        Py_ssize_t e = i;
        while (e > s && (v[e - 1] == ' ' || v[e - 1] == '\t')) e--;
        if (e == s) continue;
        if (!ieq(v + s, e - s, "keep-alive") && !ieq(v + s, e - s, "close")) return 0;
    }
    return 1;
}

/* One field of a head the parser already checked: the name's length and the value without
 * surrounding whitespace. `q` starts a field line, `end` is where the last line's CRLF is;
 * returns the start of the next line. */
typedef struct {
    Py_ssize_t nl;
    const char *v, *ve;
} Field;

static inline const char *field_at(const char *q, const char *end, Field *f) {
    const char *le = memchr(q, '\r', end - q);
    const char *colon = memchr(q, ':', le - q);
    const char *v = colon + 1;
    while (v < le && (*v == ' ' || *v == '\t')) v++;
    const char *ve = le;
    while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t')) ve--;
    f->nl = colon - q;
    f->v = v;
    f->ve = ve;
    return le + 2;
}

/* ---------------------------------------------------------------------------------------- */
/* ids and the date line                                                                     */

static uint64_t rng_s[4];

static inline uint64_t rotl(const uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t rng_next(void) { /* xoshiro256** */
    const uint64_t result = rotl(rng_s[1] * 5, 7) * 9;
    const uint64_t t = rng_s[1] << 17;
    rng_s[2] ^= rng_s[0];
    rng_s[3] ^= rng_s[1];
    rng_s[1] ^= rng_s[2];
    rng_s[0] ^= rng_s[3];
    rng_s[2] ^= t;
    rng_s[3] = rotl(rng_s[3], 45);
    return result;
}

static const char HEX[] = "0123456789abcdef";

static void hex64(char *out, uint64_t v) {
    for (int i = 15; i >= 0; i--) {
        out[i] = HEX[v & 15];
        v >>= 4;
    }
}

/* SHA-256 (FIPS 180-4): API keys are looked up by their digest, as consumers.py keeps them */
static const uint32_t K256[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

#define ROR32(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void sha256_block(uint32_t h[8], const unsigned char *p) {
    uint32_t w[64];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
               (uint32_t)p[4 * i + 2] << 8 | (uint32_t)p[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ROR32(w[i - 15], 7) ^ ROR32(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROR32(w[i - 2], 17) ^ ROR32(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], k = h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t S1 = ROR32(e, 6) ^ ROR32(e, 11) ^ ROR32(e, 25);
        uint32_t ch = (e & f) ^ (~e & g);
        uint32_t t1 = k + S1 + ch + K256[i] + w[i];
        uint32_t S0 = ROR32(a, 2) ^ ROR32(a, 13) ^ ROR32(a, 22);
        uint32_t mj = (a & b) ^ (a & c) ^ (b & c);
        uint32_t t2 = S0 + mj;
        k = g;
        g = f;
        f = e;
        e = d + t1;
        d = c;
        c = b;
        b = a;
        a = t1 + t2;
    }
    h[0] += a;
    h[1] += b;
    h[2] += c;
    h[3] += d;
    h[4] += e;
    h[5] += f;
    h[6] += g;
    h[7] += k;
}

static void sha256(const unsigned char *data, size_t n, unsigned char out[32]) {
    uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                     0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    size_t i = 0;
    for (; i + 64 <= n; i += 64) sha256_block(h, data + i);
    unsigned char tail[128];
    size_t rest = n - i;
    memcpy(tail, data + i, rest);
    tail[rest] = 0x80;
    size_t len = rest + 1 <= 56 ? 64 : 128;
    memset(tail + rest + 1, 0, len - rest - 1);
    uint64_t bits = (uint64_t)n * 8;
    for (int j = 0; j < 8; j++) tail[len - 1 - j] = (unsigned char)(bits >> (8 * j));
    sha256_block(h, tail);
    if (len == 128) sha256_block(h, tail + 64);
    for (int j = 0; j < 8; j++) {
        out[4 * j] = (unsigned char)(h[j] >> 24);
        out[4 * j + 1] = (unsigned char)(h[j] >> 16);
        out[4 * j + 2] = (unsigned char)(h[j] >> 8);
        out[4 * j + 3] = (unsigned char)h[j];
    }
}

/* lane's own check that the SHA-256 above is right (run at import) */
static int sha256_selftest(void) {
    static const unsigned char abc[32] = {
        0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea, 0x41, 0x41, 0x40, 0xde, 0x5d, 0xae, 0x22, 0x23,
        0xb0, 0x03, 0x61, 0xa3, 0x96, 0x17, 0x7a, 0x9c, 0xb4, 0x10, 0xff, 0x61, 0xf2, 0x00, 0x15, 0xad};
    unsigned char out[32];
    sha256((const unsigned char *)"abc", 3, out);
    return memcmp(out, abc, 32) == 0;
}

static time_t date_second = 0;
static char date_line[64]; /* "date: Wed, 02 Dec 2026 16:27:26 GMT\r\n" */
static Py_ssize_t date_len = 0;

static void date_refresh(void) {
    time_t now = time(NULL);
    if (now == date_second) return;
    static const char *days[] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
    static const char *months[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                   "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
    struct tm tm;
    gmtime_r(&now, &tm);
    date_len = snprintf(date_line, sizeof date_line, "date: %s, %02d %s %04d %02d:%02d:%02d GMT\r\n",
                        days[tm.tm_wday], tm.tm_mday, months[tm.tm_mon], tm.tm_year + 1900,
                        tm.tm_hour, tm.tm_min, tm.tm_sec);
    date_second = now;
}

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---------------------------------------------------------------------------------------- */
/* interned names                                                                            */

static PyObject *s_write, *s_close, *s_abort, *s_pause_reading, *s_resume_reading,
    *s_get_extra_info, *s_peername, *s_connections, *s_check_drained, *s_add, *s_discard,
    *s_can_write_eof, *s_write_eof;

/* ---------------------------------------------------------------------------------------- */
/* types                                                                                     */

typedef struct Lane Lane;
typedef struct LaneConn LaneConn;
typedef struct UpConn UpConn;
typedef struct LaneTarget LaneTarget;
typedef struct LaneRoute LaneRoute;

static PyTypeObject LaneType, LaneConnType, UpConnType, LaneTargetType, LaneRouteType;

struct Lane {
    PyObject_HEAD
    PyObject *resolve;   /* (method, host, path) -> LaneRoute | None */
    PyObject *pick;      /* (route) -> LaneTarget | None; books the attempt's start */
    PyObject *done;      /* (route, target, status, bytes, t_start, t_sent, t_head, t_end,
                          * request_id, trace_id, method, path, consumer, log line) */
    PyObject *connect;   /* (target) -> None: opens a connection, then target.connected(up) */
    PyObject *handover;  /* (conn, transport, data, resume) -> None */
    PyObject *server;    /* the http1 Server: its _connections set and _check_drained() */
    PyObject *cache;     /* dict: method \0 host \0 path -> LaneRoute or None */
    PyObject *via;       /* bytes, this gateway's Via hop */
    Py_ssize_t max_header_bytes, max_header_count, max_body_bytes, max_cache;
    double idle_timeout, write_timeout;
    double header_timeout; /* a new connection's wait for its first request (0: idle_timeout) */
    double sample_ratio;
    int draining;
    int log_lines;       /* write each request's access-log line here (done() gets it) */
    char id_prefix[13];  /* request ids made here: <12 hex>-<counter in hex> */
    unsigned long long ids;
    LaneConn *conns; /* live client connections (for the sweep and draining) */
    unsigned long long requests, handovers;
};

struct LaneRoute {
    PyObject_HEAD
    PyObject *payload;   /* whatever the Python side needs back (the CompiledRoute) */
    PyObject *path;      /* bytes: the upstream path, without the query */
    PyObject *host;      /* bytes: the Host to send, or None to send the request's (pass) */
    int host_target;     /* send the target's authority */
    unsigned char retry[600]; /* the upstream's retry statuses, by status */
    double ttfb_timeout, read_timeout, total_timeout;
    Py_ssize_t max_body_bytes;
    /* key_auth's success path (NULL: no key_auth): where the key is looked for, and the
     * consumers by key digest: digest -> (digest, consumer name, upstream header fields) */
    PyObject *keys;
    PyObject *key_headers; /* tuple of lower-case names, in order of preference */
    PyObject *key_query;   /* tuple of query parameter names */
    int key_bearer;
    int key_hide;          /* hide_credentials: the key does not go upstream */
    PyObject *rid_header;  /* request_id: the header (lower-case bytes), NULL without */
    int rid_trust, rid_echo;
    PyObject *log_head;    /* `"route":...,` JSON fragments of the access log (bytes) */
    PyObject *log_upstream;
    /* the rest of the access phase (the memory rate limit): (consumer name or None,
     * client address) -> response header fields to add, or None: refused (Python path) */
    PyObject *access;
};

struct LaneTarget {
    PyObject_HEAD
    PyObject *payload;    /* the Python Target */
    PyObject *authority;  /* bytes */
    PyObject *pool;       /* the Python path's pool of the same target: shares max_connections */
    PyObject *log_label;  /* the target's label as a JSON string (bytes) */
    UpConn **idle;
    Py_ssize_t n_idle, cap_idle;
    Py_ssize_t conns, max_conns, max_idle;
    double idle_timeout;
    LaneConn **waiting;   /* client connections waiting for a new connection */
    Py_ssize_t n_waiting, cap_waiting;
};

enum { HIDE_NONE, HIDE_HEADERS, HIDE_AUTHORIZATION, HIDE_QUERY };
enum { S_IDLE, S_WAIT_CONN, S_SENT, S_BODY, S_DONE_CLOSE, S_HANDED, S_CLOSED };
enum { F_NONE, F_LENGTH, F_CHUNKED, F_EOF };
enum { CH_SIZE, CH_EXT, CH_SIZE_LF, CH_DATA, CH_DATA_CR, CH_DATA_LF, CH_TRAILER, CH_TRAILER_LF, CH_END };

struct LaneConn {
    PyObject_HEAD
    Lane *lane;
    PyObject *transport;
    PyObject *client_ip; /* bytes */
    Buf in;
    int state;
    int read_paused, write_paused, eof, closing, draining;
    double idle_since, write_paused_since;
    LaneConn *prev, *next;
    /* the request in progress */
    LaneRoute *route;
    LaneTarget *target;
    UpConn *up;
    Py_ssize_t req_len;   /* bytes of `in` this request occupies */
    int keep_alive, v11, is_head, idempotent, retried;
    PyObject *request;   /* bytes sent upstream (kept for one re-send on a fresh connection) */
    PyObject *method, *path, *request_id, *trace_id;
    Py_ssize_t fields_off, fields_len; /* the header fields within `request` */
    PyObject *consumer;      /* (name, upstream header fields) of key_auth's consumer */
    PyObject *resp_fields;   /* response header fields the access phase added (bytes) */
    int hide;                /* where the key was, to leave it out upstream: HIDE_* */
    PyObject *rid;           /* request_id's id (bytes), NULL without the plugin */
    int rid_new;             /* made here: replaces the client's header upstream */
    double t_start, t_sent, t_head, last_read;
    int status;
    long long bytes_sent;
    int out_framing;     /* how the client's body is framed: F_LENGTH, F_CHUNKED, F_EOF, F_NONE */
    PyObject *error_body;/* a retryable answer being collected */
};

struct UpConn {
    PyObject_HEAD
    PyObject *transport;
    LaneTarget *target;
    LaneConn *client;
    Buf in;
    int reused, got_bytes, closed, keep_alive, paused;
    int framing;
    long long remaining;
    int chunk_state;
    long long chunk_left;
    double idle_since;
    /* a retryable status being buffered for the Python side */
    int collecting;
    int status;
    PyObject *reason, *headers;
    Buf body;
};

/* ---------------------------------------------------------------------------------------- */
/* calling the transport                                                                     */

static int t_write(PyObject *transport, const char *d, Py_ssize_t n) {
    PyObject *b = PyBytes_FromStringAndSize(d, n);
    if (b == NULL) return -1;
    PyObject *r = PyObject_CallMethodOneArg(transport, s_write, b);
    Py_DECREF(b);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

static void t_call(PyObject *transport, PyObject *name) {
    if (transport == NULL) return;
    PyObject *r = PyObject_CallMethodNoArgs(transport, name);
    if (r == NULL)
        PyErr_WriteUnraisable(transport);
    else
        Py_DECREF(r);
}

/* ---------------------------------------------------------------------------------------- */
/* LaneRoute                                                                                 */

static int route_init(LaneRoute *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"payload", "path", "host", "host_target", "retry_statuses",
                             "ttfb_timeout", "read_timeout", "total_timeout", "max_body_bytes",
                             "keys", "key_headers", "key_query", "key_bearer", "key_hide",
                             "access", "log_route", "log_upstream", "rid_header", "rid_trust",
                             "rid_echo", NULL};
    PyObject *payload, *path, *host, *retry;
    PyObject *keys = Py_None, *key_headers = NULL, *key_query = NULL, *access = Py_None;
    PyObject *log_route = NULL, *log_upstream = NULL, *rid_header = Py_None;
    int rid_trust = 1, rid_echo = 1;
    int host_target, key_bearer = 0, key_hide = 0;
    double ttfb, read, total;
    Py_ssize_t max_body;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OSOpOdddn|OO!O!ppOSSOpp", kwlist, &payload,
                                     &path, &host, &host_target, &retry, &ttfb, &read, &total,
                                     &max_body, &keys, &PyTuple_Type, &key_headers, &PyTuple_Type,
                                     &key_query, &key_bearer, &key_hide, &access, &log_route,
                                     &log_upstream, &rid_header, &rid_trust, &rid_echo))
        return -1;
    if (keys != Py_None && !PyDict_Check(keys)) {
        PyErr_SetString(PyExc_TypeError, "keys must be a dict or None");
        return -1;
    }
    Py_XSETREF(self->keys, keys == Py_None ? NULL : Py_NewRef(keys));
    Py_XSETREF(self->key_headers, key_headers ? Py_NewRef(key_headers) : PyTuple_New(0));
    Py_XSETREF(self->key_query, key_query ? Py_NewRef(key_query) : PyTuple_New(0));
    Py_XSETREF(self->access, access == Py_None ? NULL : Py_NewRef(access));
    self->key_bearer = key_bearer;
    self->key_hide = key_hide;
    if (rid_header != Py_None && !PyBytes_Check(rid_header)) {
        PyErr_SetString(PyExc_TypeError, "rid_header must be bytes or None");
        return -1;
    }
    Py_XSETREF(self->rid_header, rid_header == Py_None ? NULL : Py_NewRef(rid_header));
    self->rid_trust = rid_trust;
    self->rid_echo = rid_echo;
    Py_XSETREF(self->log_head, log_route ? Py_NewRef(log_route) : PyBytes_FromString("null"));
    Py_XSETREF(self->log_upstream, log_upstream ? Py_NewRef(log_upstream) : PyBytes_FromString("null"));
    if (self->log_head == NULL || self->log_upstream == NULL) return -1;
    if (self->key_headers == NULL || self->key_query == NULL) return -1;
    if (host != Py_None && !PyBytes_Check(host)) {
        PyErr_SetString(PyExc_TypeError, "host must be bytes or None");
        return -1;
    }
    Py_INCREF(payload);
    Py_XSETREF(self->payload, payload);
    Py_INCREF(path);
    Py_XSETREF(self->path, path);
    Py_INCREF(host);
    Py_XSETREF(self->host, host);
    memset(self->retry, 0, sizeof self->retry);
    if (retry != Py_None) {
        PyObject *it = PyObject_GetIter(retry);
        if (it == NULL) return -1;
        PyObject *item;
        while ((item = PyIter_Next(it)) != NULL) {
            long code = PyLong_AsLong(item);
            Py_DECREF(item);
            if (code == -1 && PyErr_Occurred()) break;
            if (code >= 0 && code < 600) self->retry[code] = 1;
        }
        Py_DECREF(it);
        if (PyErr_Occurred()) return -1;
    }
    self->host_target = host_target;
    self->ttfb_timeout = ttfb;
    self->read_timeout = read;
    self->total_timeout = total;
    self->max_body_bytes = max_body;
    return 0;
}

static int route_traverse(LaneRoute *self, visitproc visit, void *arg) {
    Py_VISIT(self->payload);
    Py_VISIT(self->path);
    Py_VISIT(self->host);
    Py_VISIT(self->keys);
    Py_VISIT(self->key_headers);
    Py_VISIT(self->key_query);
    Py_VISIT(self->access);
    Py_VISIT(self->log_head);
    Py_VISIT(self->log_upstream);
    Py_VISIT(self->rid_header);
    return 0;
}

static int route_clear(LaneRoute *self) {
    Py_CLEAR(self->payload);
    Py_CLEAR(self->path);
    Py_CLEAR(self->host);
    Py_CLEAR(self->keys);
    Py_CLEAR(self->key_headers);
    Py_CLEAR(self->key_query);
    Py_CLEAR(self->access);
    Py_CLEAR(self->log_head);
    Py_CLEAR(self->log_upstream);
    Py_CLEAR(self->rid_header);
    return 0;
}

static void route_dealloc(LaneRoute *self) {
    PyObject_GC_UnTrack(self);
    route_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef route_members[] = {
    {"payload", T_OBJECT, offsetof(LaneRoute, payload), READONLY, NULL},
    {"path", T_OBJECT, offsetof(LaneRoute, path), READONLY, NULL},
    {NULL},
};

static PyTypeObject LaneRouteType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "piuptime.gateway._lane.LaneRoute",
    .tp_doc = "A lane-eligible route for one exact method, host and path.",
    .tp_basicsize = sizeof(LaneRoute),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)route_init,
    .tp_dealloc = (destructor)route_dealloc,
    .tp_traverse = (traverseproc)route_traverse,
    .tp_clear = (inquiry)route_clear,
    .tp_members = route_members,
};

/* ---------------------------------------------------------------------------------------- */
/* forward declarations                                                                      */

static void conn_process(LaneConn *c);
static void conn_handover(LaneConn *c, PyObject *resume);
static void conn_fail_attempt(LaneConn *c, const char *kind, int sent, PyObject *answer);
static void conn_finish(LaneConn *c);
static void conn_abort(LaneConn *c);
static void conn_send(LaneConn *c, UpConn *u);
static void up_close(UpConn *u, int abort);
static void up_release(UpConn *u);
static void up_relay(UpConn *u);

/* ---------------------------------------------------------------------------------------- */
/* LaneTarget: the lane's pool of one target                                                 */

static int target_init(LaneTarget *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"payload", "authority", "pool", "max_connections", "max_idle",
                             "idle_timeout", "log_label", NULL};
    PyObject *payload, *authority, *pool, *log_label = NULL;
    Py_ssize_t max_conns, max_idle;
    double idle_timeout;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OSOnnd|S", kwlist, &payload, &authority, &pool,
                                     &max_conns, &max_idle, &idle_timeout, &log_label))
        return -1;
    Py_XSETREF(self->log_label, log_label ? Py_NewRef(log_label) : PyBytes_FromString("null"));
    if (self->log_label == NULL) return -1;
    Py_INCREF(pool);
    Py_XSETREF(self->pool, pool);
    Py_INCREF(payload);
    Py_XSETREF(self->payload, payload);
    Py_INCREF(authority);
    Py_XSETREF(self->authority, authority);
    self->max_conns = max_conns;
    self->max_idle = max_idle;
    self->idle_timeout = idle_timeout;
    return 0;
}

static int target_traverse(LaneTarget *self, visitproc visit, void *arg) {
    Py_VISIT(self->payload);
    Py_VISIT(self->authority);
    Py_VISIT(self->pool);
    Py_VISIT(self->log_label);
    for (Py_ssize_t i = 0; i < self->n_idle; i++) Py_VISIT((PyObject *)self->idle[i]);
    for (Py_ssize_t i = 0; i < self->n_waiting; i++) Py_VISIT((PyObject *)self->waiting[i]);
    return 0;
}

static int target_clear(LaneTarget *self) {
    Py_CLEAR(self->payload);
    Py_CLEAR(self->authority);
    Py_CLEAR(self->pool);
    Py_CLEAR(self->log_label);
    while (self->n_idle > 0) {
        UpConn *u = self->idle[--self->n_idle];
        Py_DECREF(u);
    }
    while (self->n_waiting > 0) {
        LaneConn *c = self->waiting[--self->n_waiting];
        Py_DECREF(c);
    }
    return 0;
}

static void target_dealloc(LaneTarget *self) {
    PyObject_GC_UnTrack(self);
    target_clear(self);
    PyMem_Free(self->idle);
    PyMem_Free(self->waiting);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int target_push_idle(LaneTarget *t, UpConn *u) {
    if (t->n_idle == t->cap_idle) {
        Py_ssize_t cap = t->cap_idle ? t->cap_idle * 2 : 16;
        UpConn **p = PyMem_Realloc(t->idle, cap * sizeof(UpConn *));
        if (p == NULL) return -1;
        t->idle = p;
        t->cap_idle = cap;
    }
    Py_INCREF(u);
    t->idle[t->n_idle++] = u;
    return 0;
}

static int target_push_waiting(LaneTarget *t, LaneConn *c) {
    if (t->n_waiting == t->cap_waiting) {
        Py_ssize_t cap = t->cap_waiting ? t->cap_waiting * 2 : 16;
        LaneConn **p = PyMem_Realloc(t->waiting, cap * sizeof(LaneConn *));
        if (p == NULL) return -1;
        t->waiting = p;
        t->cap_waiting = cap;
    }
    Py_INCREF(c);
    t->waiting[t->n_waiting++] = c;
    return 0;
}

/* The oldest client waiting for a connection (a new reference), or NULL. */
static LaneConn *target_pop_waiting(LaneTarget *t) {
    while (t->n_waiting > 0) {
        LaneConn *c = t->waiting[0];
        memmove(t->waiting, t->waiting + 1, (t->n_waiting - 1) * sizeof(LaneConn *));
        t->n_waiting--;
        if (c->state == S_WAIT_CONN && c->target == t) return c;
        Py_DECREF(c);
    }
    return NULL;
}

static void target_remove_idle(LaneTarget *t, UpConn *u) {
    for (Py_ssize_t i = 0; i < t->n_idle; i++) {
        if (t->idle[i] == u) {
            memmove(t->idle + i, t->idle + i + 1, (t->n_idle - i - 1) * sizeof(UpConn *));
            t->n_idle--;
            Py_DECREF(u);
            return;
        }
    }
}

/* target.connected(up): a new connection is ready (called by the Python connect helper). */
static PyObject *target_connected(LaneTarget *t, PyObject *arg) {
    if (!PyObject_TypeCheck(arg, &UpConnType)) {
        PyErr_SetString(PyExc_TypeError, "an UpConn is needed");
        return NULL;
    }
    UpConn *u = (UpConn *)arg;
    LaneConn *c = target_pop_waiting(t);
    if (c == NULL) {
        u->idle_since = mono();
        if (t->n_idle < t->max_idle && target_push_idle(t, u) == 0) Py_RETURN_NONE;
        up_close(u, 0);
        Py_RETURN_NONE;
    }
    conn_send(c, u);
    Py_DECREF(c);
    Py_RETURN_NONE;
}

/* target.connect_failed(message): no connection could be made; one waiting client fails. */
static PyObject *target_connect_failed(LaneTarget *t, PyObject *args) {
    const char *kind;
    if (!PyArg_ParseTuple(args, "s", &kind)) return NULL;
    t->conns--;
    LaneConn *c = target_pop_waiting(t);
    if (c != NULL) {
        conn_fail_attempt(c, kind, 0, NULL);
        Py_DECREF(c);
    }
    Py_RETURN_NONE;
}

/* target.new_conn(): the protocol object for a connection the Python side is about to open. */
static PyObject *target_new_conn(LaneTarget *t, PyObject *unused) {
    UpConn *u = PyObject_GC_New(UpConn, &UpConnType);
    if (u == NULL) return NULL;
    memset(((char *)u) + sizeof(PyObject), 0, sizeof(UpConn) - sizeof(PyObject));
    Py_INCREF(t);
    u->target = t;
    PyObject_GC_Track(u);
    return (PyObject *)u;
}

/* target.close_idle(): close every idle connection (reload retired the target, or stop). */
static PyObject *target_close_idle(LaneTarget *t, PyObject *unused) {
    while (t->n_idle > 0) {
        UpConn *u = t->idle[--t->n_idle];
        up_close(u, 0);
        Py_DECREF(u);
    }
    Py_RETURN_NONE;
}

/* target.close_one_idle(): close the least recently used idle connection (the Python path's
 * pool needs its slot); False when none is idle. */
static PyObject *target_close_one_idle(LaneTarget *t, PyObject *unused) {
    if (t->n_idle == 0) Py_RETURN_FALSE;
    UpConn *u = t->idle[0];
    memmove(t->idle, t->idle + 1, (t->n_idle - 1) * sizeof(UpConn *));
    t->n_idle--;
    up_close(u, 0);
    Py_DECREF(u);
    Py_RETURN_TRUE;
}

/* May the lane open one more connection to `t`, counting the Python pool's? */
static int target_room(LaneTarget *t) {
    Py_ssize_t theirs = 0;
    if (t->pool != NULL && t->pool != Py_None) {
        PyObject *open = PyObject_GetAttrString(t->pool, "open");
        if (open == NULL) return -1;
        theirs = PyLong_AsSsize_t(open);
        Py_DECREF(open);
        if (theirs == -1 && PyErr_Occurred()) return -1;
    }
    if (t->conns + theirs < t->max_conns) return 1;
    if (t->conns < t->max_conns && theirs > 0) {
        PyObject *r = PyObject_CallMethod(t->pool, "close_one_idle", NULL);
        if (r == NULL) return -1;
        int closed = PyObject_IsTrue(r);
        Py_DECREF(r);
        return closed;
    }
    return 0;
}

/* target.expire(now): close idle connections older than the pool's idle timeout. */
static PyObject *target_expire(LaneTarget *t, PyObject *arg) {
    double now = PyFloat_AsDouble(arg);
    if (now == -1.0 && PyErr_Occurred()) return NULL;
    Py_ssize_t j = 0;
    for (Py_ssize_t i = 0; i < t->n_idle; i++) {
        UpConn *u = t->idle[i];
        if (now - u->idle_since > t->idle_timeout) {
            up_close(u, 0);
            Py_DECREF(u);
        } else {
            t->idle[j++] = u;
        }
    }
    t->n_idle = j;
    Py_RETURN_NONE;
}

static PyMethodDef target_methods[] = {
    {"connected", (PyCFunction)target_connected, METH_O, NULL},
    {"connect_failed", (PyCFunction)target_connect_failed, METH_VARARGS, NULL},
    {"new_conn", (PyCFunction)target_new_conn, METH_NOARGS, NULL},
    {"close_idle", (PyCFunction)target_close_idle, METH_NOARGS, NULL},
    {"close_one_idle", (PyCFunction)target_close_one_idle, METH_NOARGS, NULL},
    {"expire", (PyCFunction)target_expire, METH_O, NULL},
    {NULL},
};

static PyMemberDef target_members[] = {
    {"payload", T_OBJECT, offsetof(LaneTarget, payload), READONLY, NULL},
    {"connections", T_PYSSIZET, offsetof(LaneTarget, conns), READONLY, NULL},
    {"idle", T_PYSSIZET, offsetof(LaneTarget, n_idle), READONLY, NULL},
    {"max_connections", T_PYSSIZET, offsetof(LaneTarget, max_conns), 0, NULL},
    {"max_idle", T_PYSSIZET, offsetof(LaneTarget, max_idle), 0, NULL},
    {"idle_timeout", T_DOUBLE, offsetof(LaneTarget, idle_timeout), 0, NULL},
    {NULL},
};

static PyTypeObject LaneTargetType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "piuptime.gateway._lane.LaneTarget",
    .tp_doc = "The lane's keep-alive pool of one upstream target.",
    .tp_basicsize = sizeof(LaneTarget),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)target_init,
    .tp_dealloc = (destructor)target_dealloc,
    .tp_traverse = (traverseproc)target_traverse,
    .tp_clear = (inquiry)target_clear,
    .tp_methods = target_methods,
    .tp_members = target_members,
};

/* ---------------------------------------------------------------------------------------- */
/* UpConn: one upstream connection                                                           */

static int up_traverse(UpConn *self, visitproc visit, void *arg) {
    Py_VISIT(self->transport);
    Py_VISIT((PyObject *)self->target);
    Py_VISIT((PyObject *)self->client);
    Py_VISIT(self->reason);
    Py_VISIT(self->headers);
    return 0;
}

static int up_clear(UpConn *self) {
    Py_CLEAR(self->transport);
    Py_CLEAR(self->target);
    Py_CLEAR(self->client);
    Py_CLEAR(self->reason);
    Py_CLEAR(self->headers);
    return 0;
}

static void up_dealloc(UpConn *self) {
    PyObject_GC_UnTrack(self);
    up_clear(self);
    buf_free(&self->in);
    buf_free(&self->body);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static void up_close(UpConn *u, int abort) {
    if (u->closed) return;
    u->closed = 1;
    if (u->target != NULL) u->target->conns--;
    t_call(u->transport, abort ? s_abort : s_close);
}

static PyObject *up_connection_made(UpConn *u, PyObject *transport) {
    Py_INCREF(transport);
    Py_XSETREF(u->transport, transport);
    Py_RETURN_NONE;
}

static void up_reset_response(UpConn *u) {
    u->got_bytes = 0;
    u->framing = F_NONE;
    u->remaining = 0;
    u->chunk_state = CH_SIZE;
    u->chunk_left = 0;
    u->collecting = 0;
    u->status = 0;
    Py_CLEAR(u->reason);
    Py_CLEAR(u->headers);
    u->body.len = 0;
}

/* The exchange ended well and the connection may carry another request: back to the pool. */
static void up_release(UpConn *u) {
    LaneTarget *t = u->target;
    LaneConn *c = u->client;
    u->client = NULL;
    Py_XDECREF(c);
    up_reset_response(u);
    if (u->paused) {
        u->paused = 0;
        t_call(u->transport, s_resume_reading);
    }
    if (u->closed || !u->keep_alive || u->in.len > 0 || t == NULL) {
        up_close(u, 0);
        return;
    }
    u->reused = 1;
    LaneConn *w = target_pop_waiting(t);
    if (w != NULL) {
        conn_send(w, u);
        Py_DECREF(w);
        return;
    }
    u->idle_since = mono();
    if (t->n_idle >= t->max_idle || target_push_idle(t, u) < 0) up_close(u, 0);
}

/* Parse the status line and headers of an answer in u->in. Returns the head's length, 0 when
 * more bytes are needed, -1 when the answer is malformed (or not one the lane relays). */
typedef struct {
    int status;
    int v11;
    const char *reason;
    Py_ssize_t reason_len;
    long long content_length; /* -1: none */
    int chunked, conn_close, conn_keep_alive;
    const char *connection;   /* the Connection value, for the names it lists */
    Py_ssize_t connection_len;
} RespHead;

static Py_ssize_t parse_response_head(const char *p, Py_ssize_t n, RespHead *h) {
    const char *end = NULL;
    for (Py_ssize_t i = 0; i + 3 < n; i++) {
        const char *q = memchr(p + i, '\r', n - i - 3);
        if (q == NULL) break;
        if (q[1] == '\n' && q[2] == '\r' && q[3] == '\n') {
            end = q;
            break;
        }
        i = q - p;
    }
    if (end == NULL) return n > 65536 ? -1 : 0;
    memset(h, 0, sizeof *h);
    h->content_length = -1;
    if (end - p < 12 || memcmp(p, "HTTP/1.", 7) != 0 || (p[7] != '1' && p[7] != '0') ||
        p[8] != ' ')
        return -1;
    h->v11 = p[7] == '1';
    if (p[9] < '1' || p[9] > '5' || p[10] < '0' || p[10] > '9' || p[11] < '0' || p[11] > '9')
        return -1;
    h->status = (p[9] - '0') * 100 + (p[10] - '0') * 10 + (p[11] - '0');
    const char *line_end = memchr(p, '\r', end - p + 1);
    if (line_end[1] != '\n') return -1;
    if (line_end > p + 12) {
        if (p[12] != ' ') return -1;
        h->reason = p + 13;
        h->reason_len = line_end - (p + 13);
    } else {
        h->reason = p + 12;
        h->reason_len = 0;
    }
    for (const char *r = h->reason; r < line_end; r++)
        if (!vchar((unsigned char)*r)) return -1;
    const char *q = line_end + 2;
    int te_seen = 0;
    while (q < end + 2) {
        if (q == end + 2) break;
        const char *le = memchr(q, '\r', end + 2 - q);
        if (le == NULL || le[1] != '\n') return -1;
        if (le == q) break;
        const char *colon = q;
        while (colon < le && TCHAR[(unsigned char)*colon]) colon++;
        if (colon == q || colon == le || *colon != ':') return -1;
        const char *v = colon + 1;
        while (v < le && (*v == ' ' || *v == '\t')) v++;
        const char *ve = le;
        while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t')) ve--;
        for (const char *x = v; x < ve; x++)
            if (!vchar((unsigned char)*x)) return -1;
        Py_ssize_t nl = colon - q, vl = ve - v;
        if (ieq(q, nl, "content-length")) {
            if (h->content_length >= 0 || vl == 0 || vl > 18) return -1;
            long long cl = 0;
            for (Py_ssize_t i = 0; i < vl; i++) {
                if (v[i] < '0' || v[i] > '9') return -1;
                cl = cl * 10 + (v[i] - '0');
            }
            h->content_length = cl;
        } else if (ieq(q, nl, "transfer-encoding")) {
            if (te_seen || !ieq(v, vl, "chunked")) return -1;
            te_seen = 1;
            h->chunked = 1;
        } else if (ieq(q, nl, "connection")) {
            if (h->connection != NULL) return -1; /* twice: left to the Python path */
            h->connection = v;
            h->connection_len = vl;
            if (conn_names(v, vl, "close", 5)) h->conn_close = 1;
            if (conn_names(v, vl, "keep-alive", 10)) h->conn_keep_alive = 1;
        }
        q = le + 2;
    }
    if (h->chunked && h->content_length >= 0) return -1;
    return (end - p) + 4;
}

static const char *const DOWN_DROP[] = {
    "connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade",
    "content-length", "date", "via", NULL,
};

/* Write the answer's head for the client: cleaned upstream fields, our via, the framing. */
static int build_client_head(LaneConn *c, UpConn *u, const char *p, Py_ssize_t head_len,
                             RespHead *h, Buf *out) {
    Lane *lane = c->lane;
    int no_body = c->is_head || h->status == 204 || h->status == 304;
    char line[16];
    int ln = snprintf(line, sizeof line, "HTTP/1.1 %d ", h->status);
    if (buf_add(out, line, ln) < 0 || buf_add(out, h->reason, h->reason_len) < 0 ||
        BUF_LIT(out, "\r\n") < 0)
        return -1;
    const char *end = p + head_len - 2;
    const char *q = memchr(p, '\n', head_len) + 1;
    Buf via = {0};
    while (q < end) {
        Field f;
        const char *next = field_at(q, end, &f);
        Py_ssize_t nl = f.nl;
        const char *v = f.v, *ve = f.ve;
        int drop = 0;
        for (int i = 0; DOWN_DROP[i] != NULL; i++)
            if (ieq(q, nl, DOWN_DROP[i])) {
                drop = 1;
                break;
            }
        if (drop && ieq(q, nl, "via")) {
            if (via.len && BUF_LIT(&via, ", ") < 0) goto fail;
            if (buf_add(&via, v, ve - v) < 0) goto fail;
        }
        if (!drop && nl >= 6 && ieq(q, 6, "proxy-")) drop = 1;
        if (!drop && h->connection != NULL) {
            char name[64];
            if (nl < (Py_ssize_t)sizeof name) {
                for (Py_ssize_t i = 0; i < nl; i++) name[i] = (char)lower((unsigned char)q[i]);
                if (conn_names(h->connection, h->connection_len, name, nl)) drop = 1;
            }
        }
        if (!drop) {
            if (buf_add_field(out, q, nl, v, ve - v) < 0) goto fail;
        }
        q = next;
    }
    if (c->resp_fields != NULL &&
        buf_add(out, PyBytes_AS_STRING(c->resp_fields), PyBytes_GET_SIZE(c->resp_fields)) < 0)
        goto fail;
    /* framing for the client */
    int keep = c->keep_alive && !lane->draining && !c->draining;
    if (!h->chunked && h->content_length >= 0) {
        if (BUF_LIT(out, "content-length: ") < 0 || buf_add_dec(out, h->content_length) < 0 ||
            BUF_LIT(out, "\r\n") < 0)
            goto fail;
        c->out_framing = no_body ? F_NONE : F_LENGTH;
    } else if (no_body) {
        c->out_framing = F_NONE;
    } else if (c->v11) {
        c->out_framing = F_CHUNKED;
    } else {
        c->out_framing = F_EOF;
        keep = 0;
    }
    if (BUF_LIT(out, "via: ") < 0) goto fail;
    if (via.len && (buf_add(out, via.p, via.len) < 0 || BUF_LIT(out, ", ") < 0)) goto fail;
    if (buf_add(out, PyBytes_AS_STRING(lane->via), PyBytes_GET_SIZE(lane->via)) < 0 ||
        BUF_LIT(out, "\r\n") < 0)
        goto fail;
    if (c->out_framing == F_CHUNKED && BUF_LIT(out, "transfer-encoding: chunked\r\n") < 0) goto fail;
    date_refresh();
    if (!keep) {
        if (BUF_LIT(out, "connection: close\r\n") < 0) goto fail;
    } else if (!c->v11) {
        if (BUF_LIT(out, "connection: keep-alive\r\n") < 0) goto fail;
    }
    if (buf_add(out, date_line, date_len) < 0 || BUF_LIT(out, "\r\n") < 0) goto fail;
    c->keep_alive = keep;
    buf_free(&via);
    return 0;
fail:
    buf_free(&via);
    return -1;
}

/* Feed body bytes of the answer: returns bytes of `p` used, sets *done when the body ended.
 * Decoded body bytes go to `sink` (NULL: counted only). -1: malformed chunk framing. */
static Py_ssize_t up_body(UpConn *u, const char *p, Py_ssize_t n, Buf *sink, int *done) {
    Py_ssize_t i = 0;
    *done = 0;
    if (u->framing == F_NONE) {
        *done = 1;
        return 0;
    }
    if (u->framing == F_LENGTH) {
        Py_ssize_t take = n < u->remaining ? n : (Py_ssize_t)u->remaining;
        if (sink != NULL && buf_add(sink, p, take) < 0) return -1;
        u->remaining -= take;
        if (u->remaining == 0) *done = 1;
        return take;
    }
    if (u->framing == F_EOF) {
        if (sink != NULL && buf_add(sink, p, n) < 0) return -1;
        return n;
    }
    while (i < n && !*done) {
        unsigned char ch = (unsigned char)p[i];
        switch (u->chunk_state) {
        case CH_SIZE:
            if ((ch >= '0' && ch <= '9') || (lower(ch) >= 'a' && lower(ch) <= 'f')) {
                if (u->chunk_left > (1LL << 40)) return -1;
                u->chunk_left = u->chunk_left * 16 +
                                (ch <= '9' ? ch - '0' : lower(ch) - 'a' + 10);
                u->remaining++; /* digits seen */
                i++;
            } else if (u->remaining == 0) {
                return -1;
            } else if (ch == ';' || ch == ' ' || ch == '\t') {
                u->chunk_state = CH_EXT;
                i++;
            } else if (ch == '\r') {
                u->chunk_state = CH_SIZE_LF;
                i++;
            } else {
                return -1;
            }
            break;
        case CH_EXT:
            if (ch == '\r') u->chunk_state = CH_SIZE_LF;
            else if (ch == '\n' || ch < 0x09 || (ch > 0x09 && ch < 0x20) || ch == 0x7f) return -1;
            i++;
            break;
        case CH_SIZE_LF:
            if (ch != '\n') return -1;
            i++;
            u->remaining = 0;
            u->chunk_state = u->chunk_left == 0 ? CH_TRAILER : CH_DATA;
            break;
        case CH_DATA: {
            Py_ssize_t take = (n - i) < u->chunk_left ? (n - i) : (Py_ssize_t)u->chunk_left;
            if (sink != NULL && buf_add(sink, p + i, take) < 0) return -1;
            u->chunk_left -= take;
            i += take;
            if (u->chunk_left == 0) u->chunk_state = CH_DATA_CR;
            break;
        }
        case CH_DATA_CR:
            if (ch != '\r') return -1;
            u->chunk_state = CH_DATA_LF;
            i++;
            break;
        case CH_DATA_LF:
            if (ch != '\n') return -1;
            u->chunk_state = CH_SIZE;
            i++;
            break;
        case CH_TRAILER: /* trailer fields are dropped; an empty line ends the message */
            if (ch == '\r') {
                u->chunk_state = CH_TRAILER_LF;
                i++;
            } else {
                const char *le = memchr(p + i, '\n', n - i);
                if (le == NULL) {
                    u->remaining += n - i;
                    if (u->remaining > 16384) return -1;
                    i = n;
                } else {
                    i = le - p + 1;
                    u->remaining = 0;
                }
            }
            break;
        case CH_TRAILER_LF:
            if (ch != '\n') return -1;
            i++;
            *done = 1;
            break;
        }
    }
    return i;
}

/* Encode decoded body bytes for the client's framing and write them. */
static int client_write_body(LaneConn *c, Buf *out, const char *d, Py_ssize_t n) {
    if (n == 0 || c->out_framing == F_NONE) return 0;
    if (c->out_framing == F_CHUNKED) {
        if (buf_add_hex(out, (size_t)n) < 0 || BUF_LIT(out, "\r\n") < 0 || buf_add(out, d, n) < 0 ||
            BUF_LIT(out, "\r\n") < 0)
            return -1;
    } else if (buf_add(out, d, n) < 0) {
        return -1;
    }
    c->bytes_sent += n;
    return 0;
}

#define LINGER_SECONDS 2.0

static Buf scratch = {0}; /* the body bytes of one read, decoded */
static Buf wire = {0};    /* what one write puts on the client's socket */

/* Relay what is buffered in u->in to the client. */
static void up_relay(UpConn *u) {
    LaneConn *c = u->client;
    if (c == NULL) return;
    Py_INCREF(c);
    wire.len = 0;
    scratch.len = 0;
    if (c->state == S_SENT) {
        RespHead h;
        Py_ssize_t hl;
        for (;;) {
            hl = parse_response_head(u->in.p, u->in.len, &h);
            if (hl <= 0) break;
            if (h.status >= 100 && h.status < 200) {
                if (h.status == 101) {
                    hl = -1;
                    break;
                }
                buf_consume(&u->in, hl); /* an informational answer: not relayed */
                continue;
            }
            break;
        }
        if (hl == 0) goto out;
        if (hl < 0) {
            up_close(u, 1);
            conn_fail_attempt(c, "protocol", 1, NULL);
            goto out;
        }
        c->t_head = mono();
        c->last_read = c->t_head;
        c->status = h.status;
        u->keep_alive = h.v11 ? !h.conn_close : h.conn_keep_alive;
        if (c->is_head || h.status == 204 || h.status == 304) {
            u->framing = F_NONE;
        } else if (h.chunked) {
            u->framing = F_CHUNKED;
        } else if (h.content_length >= 0) {
            u->framing = F_LENGTH;
            u->remaining = h.content_length;
        } else {
            u->framing = F_EOF;
            u->keep_alive = 0;
        }
        int retry = c->route->retry[h.status]; /* parse_response_head: 100..599 */
        if (retry && (u->framing != F_LENGTH || u->remaining <= 65536)) {
            /* a retryable answer: collected whole (a close-delimited one until the upstream
             * closes: up_ended), then the Python path decides */
            u->collecting = 1;
            u->status = h.status;
            u->reason = PyBytes_FromStringAndSize(h.reason, h.reason_len);
            u->headers = PyList_New(0);
            if (u->reason == NULL || u->headers == NULL) goto error;
            const char *end = u->in.p + hl - 2;
            const char *q = memchr(u->in.p, '\n', hl) + 1;
            while (q < end) {
                Field f;
                const char *next = field_at(q, end, &f);
                const char *colon = q + f.nl;
                const char *v = f.v, *ve = f.ve;
                PyObject *name = PyBytes_FromStringAndSize(q, colon - q);
                if (name == NULL) goto error;
                char *np = PyBytes_AS_STRING(name);
                for (Py_ssize_t i = 0; i < colon - q; i++) np[i] = (char)lower((unsigned char)np[i]);
                PyObject *item = Py_BuildValue("(Ny#)", name, v, (Py_ssize_t)(ve - v));
                if (item == NULL) goto error;
                int r = PyList_Append(u->headers, item);
                Py_DECREF(item);
                if (r < 0) goto error;
                q = next;
            }
            buf_consume(&u->in, hl);
            c->state = S_BODY;
        } else {
            if (build_client_head(c, u, u->in.p, hl, &h, &wire) < 0) goto error;
            buf_consume(&u->in, hl);
            c->state = S_BODY;
        }
    }
    if (c->state != S_BODY) goto out;
    int done = 0;
    Py_ssize_t used = up_body(u, u->in.p, u->in.len, &scratch, &done);
    if (used < 0) {
        if (PyErr_Occurred()) goto error;
        /* broken chunk framing */
        if (u->collecting) {
            up_close(u, 1);
            conn_fail_attempt(c, "protocol", 1, NULL);
        } else {
            up_close(u, 1);
            if (wire.len) t_write(c->transport, wire.p, wire.len);
            conn_abort(c);
        }
        goto out;
    }
    buf_consume(&u->in, used);
    if (u->collecting) {
        if (buf_add(&u->body, scratch.p, scratch.len) < 0) goto error;
        if (u->body.len > 65536 + 16384) { /* a chunked error page larger than we keep */
            up_close(u, 1);
            conn_fail_attempt(c, "protocol", 1, NULL);
            goto out;
        }
        if (done) {
            PyObject *body = PyBytes_FromStringAndSize(u->body.p, u->body.len);
            if (body == NULL) goto error;
            PyObject *answer = Py_BuildValue("(iOON)", u->status, u->reason, u->headers, body);
            if (answer == NULL) goto error;
            UpConn *keep = u;
            Py_INCREF(keep);
            up_release(u);
            conn_fail_attempt(c, "status", 1, answer);
            Py_DECREF(answer);
            Py_DECREF(keep);
        }
        goto out;
    }
    if (client_write_body(c, &wire, scratch.p, scratch.len) < 0) goto error;
    if (done) {
        if (c->out_framing == F_CHUNKED && BUF_LIT(&wire, "0\r\n\r\n") < 0) goto error;
        if (wire.len && t_write(c->transport, wire.p, wire.len) < 0) goto error;
        wire.len = 0;
        up_release(u);
        conn_finish(c);
        goto out;
    }
    if (wire.len && t_write(c->transport, wire.p, wire.len) < 0) goto error;
    if (c->write_paused && !u->paused) {
        u->paused = 1;
        t_call(u->transport, s_pause_reading);
    }
    goto out;
error:
    PyErr_WriteUnraisable((PyObject *)c);
    up_close(u, 1);
    conn_abort(c);
out:
    buf_trim(&u->in);
    if (wire.cap > 262144) buf_free(&wire);
    if (scratch.cap > 262144) buf_free(&scratch);
    Py_DECREF(c);
}

static PyObject *up_data_received(UpConn *u, PyObject *data) {
    char *d;
    Py_ssize_t n;
    if (PyBytes_AsStringAndSize(data, &d, &n) < 0) return NULL;
    if (u->client == NULL) { /* bytes nobody asked for: the connection is not reusable */
        LaneTarget *t = u->target;
        if (t != NULL) target_remove_idle(t, u);
        up_close(u, 1);
        Py_RETURN_NONE;
    }
    u->got_bytes = 1;
    u->client->last_read = mono();
    if (buf_add(&u->in, d, n) < 0) return NULL;
    up_relay(u);
    Py_RETURN_NONE;
}

/* The upstream connection ended (EOF or lost) */
static void up_ended(UpConn *u) {
    LaneTarget *t = u->target;
    int was_closed = u->closed;
    u->closed = 1;
    if (!was_closed && t != NULL) t->conns--;
    LaneConn *c = u->client;
    if (c == NULL) {
        if (t != NULL) target_remove_idle(t, u);
        return;
    }
    Py_INCREF(c);
    if (c->state == S_BODY && u->framing == F_EOF && !u->collecting) {
        /* the end of a close-delimited body */
        wire.len = 0;
        if (c->out_framing == F_CHUNKED) BUF_LIT(&wire, "0\r\n\r\n");
        if (wire.len) t_write(c->transport, wire.p, wire.len);
        u->client = NULL;
        Py_DECREF(c);
        conn_finish(c);
    } else if (c->state == S_SENT) {
        u->client = NULL;
        Py_DECREF(c);
        if (!u->got_bytes && u->reused && c->idempotent && !c->retried) {
            /* the peer had closed the pooled connection: once more on a fresh one */
            c->retried = 1;
            c->state = S_WAIT_CONN;
            if (t != NULL && target_push_waiting(t, c) == 0) {
                t->conns++;
                PyObject *r = PyObject_CallOneArg(c->lane->connect, (PyObject *)t);
                if (r == NULL) {
                    PyErr_WriteUnraisable((PyObject *)c);
                    t->conns--;
                    conn_fail_attempt(c, "reset", 0, NULL);
                } else {
                    Py_DECREF(r);
                }
            } else {
                PyErr_Clear();
                conn_fail_attempt(c, "reset", 0, NULL);
            }
        } else {
            conn_fail_attempt(c, "reset", 1, NULL);
        }
    } else if (c->state == S_BODY && u->framing == F_EOF && u->collecting) {
        /* the end of a close-delimited retryable answer: whole, to the Python path */
        u->client = NULL;
        Py_DECREF(c);
        PyObject *body = PyBytes_FromStringAndSize(u->body.p, u->body.len);
        PyObject *answer =
            body == NULL ? NULL : Py_BuildValue("(iOON)", u->status, u->reason, u->headers, body);
        if (answer == NULL) {
            PyErr_WriteUnraisable((PyObject *)c);
            conn_abort(c);
        } else {
            conn_fail_attempt(c, "status", 1, answer);
            Py_DECREF(answer);
        }
    } else if (c->state == S_BODY) {
        /* cut in the middle of the body */
        u->client = NULL;
        Py_DECREF(c);
        if (u->collecting)
            conn_fail_attempt(c, "reset", 1, NULL);
        else
            conn_abort(c);
    }
    Py_DECREF(c);
}

static PyObject *up_eof_received(UpConn *u, PyObject *unused) {
    up_ended(u);
    Py_RETURN_FALSE; /* close the transport */
}

static PyObject *up_connection_lost(UpConn *u, PyObject *exc) {
    up_ended(u);
    Py_CLEAR(u->transport);
    Py_RETURN_NONE;
}

static PyObject *up_noop(PyObject *self, PyObject *unused) { Py_RETURN_NONE; }

static PyMethodDef up_methods[] = {
    {"connection_made", (PyCFunction)up_connection_made, METH_O, NULL},
    {"data_received", (PyCFunction)up_data_received, METH_O, NULL},
    {"eof_received", (PyCFunction)up_eof_received, METH_NOARGS, NULL},
    {"connection_lost", (PyCFunction)up_connection_lost, METH_O, NULL},
    {"pause_writing", (PyCFunction)up_noop, METH_NOARGS, NULL},
    {"resume_writing", (PyCFunction)up_noop, METH_NOARGS, NULL},
    {NULL},
};

static PyTypeObject UpConnType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "piuptime.gateway._lane.UpConn",
    .tp_doc = "The lane's protocol on one upstream connection.",
    .tp_basicsize = sizeof(UpConn),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_dealloc = (destructor)up_dealloc,
    .tp_traverse = (traverseproc)up_traverse,
    .tp_clear = (inquiry)up_clear,
    .tp_methods = up_methods,
};

/* ---------------------------------------------------------------------------------------- */
/* LaneConn: one client connection                                                           */

static void conn_unlink(LaneConn *c) {
    Lane *lane = c->lane;
    if (lane == NULL) return;
    if (c->prev != NULL) c->prev->next = c->next;
    else if (lane->conns == c) lane->conns = c->next;
    if (c->next != NULL) c->next->prev = c->prev;
    c->prev = c->next = NULL;
}

static void conn_clear_request(LaneConn *c) {
    Py_CLEAR(c->route);
    Py_CLEAR(c->target);
    Py_CLEAR(c->request);
    Py_CLEAR(c->method);
    Py_CLEAR(c->path);
    Py_CLEAR(c->request_id);
    Py_CLEAR(c->trace_id);
    Py_CLEAR(c->consumer);
    Py_CLEAR(c->resp_fields);
    c->hide = HIDE_NONE;
    Py_CLEAR(c->rid);
    c->rid_new = 0;
    c->retried = 0;
    c->status = 0;
    c->bytes_sent = 0;
}

static int conn_traverse(LaneConn *self, visitproc visit, void *arg) {
    Py_VISIT((PyObject *)self->lane);
    Py_VISIT(self->transport);
    Py_VISIT(self->client_ip);
    Py_VISIT((PyObject *)self->route);
    Py_VISIT((PyObject *)self->target);
    Py_VISIT((PyObject *)self->up);
    Py_VISIT(self->request);
    Py_VISIT(self->method);
    Py_VISIT(self->path);
    Py_VISIT(self->request_id);
    Py_VISIT(self->trace_id);
    Py_VISIT(self->consumer);
    Py_VISIT(self->resp_fields);
    Py_VISIT(self->rid);
    return 0;
}

static int conn_clear(LaneConn *self) {
    conn_unlink(self);
    Py_CLEAR(self->transport);
    Py_CLEAR(self->client_ip);
    Py_CLEAR(self->up);
    conn_clear_request(self);
    Py_CLEAR(self->lane);
    return 0;
}

static void conn_dealloc(LaneConn *self) {
    PyObject_GC_UnTrack(self);
    conn_clear(self);
    buf_free(&self->in);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *conn_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    PyObject *lane;
    if (!PyArg_ParseTuple(args, "O!", &LaneType, &lane)) return NULL;
    LaneConn *c = (LaneConn *)type->tp_alloc(type, 0);
    if (c == NULL) return NULL;
    Py_INCREF(lane);
    c->lane = (Lane *)lane;
    return (PyObject *)c;
}

static void conn_register(LaneConn *c, int add) {
    Lane *lane = c->lane;
    if (lane->server == Py_None) return;
    PyObject *set = PyObject_GetAttr(lane->server, s_connections);
    if (set == NULL) {
        PyErr_WriteUnraisable((PyObject *)c);
        return;
    }
    PyObject *r = PyObject_CallMethodOneArg(set, add ? s_add : s_discard, (PyObject *)c);
    Py_DECREF(set);
    if (r == NULL) PyErr_WriteUnraisable((PyObject *)c);
    Py_XDECREF(r);
    if (!add) t_call(lane->server, s_check_drained);
}

static PyObject *conn_connection_made(LaneConn *c, PyObject *transport) {
    Py_INCREF(transport);
    Py_XSETREF(c->transport, transport);
    PyObject *peer = PyObject_CallMethodOneArg(transport, s_get_extra_info, s_peername);
    if (peer == NULL) return NULL;
    if (PyTuple_Check(peer) && PyTuple_GET_SIZE(peer) >= 2) {
        PyObject *host = PyObject_Str(PyTuple_GET_ITEM(peer, 0));
        if (host == NULL) {
            Py_DECREF(peer);
            return NULL;
        }
        Py_XSETREF(c->client_ip, PyUnicode_AsEncodedString(host, "latin-1", "replace"));
        Py_DECREF(host);
    } else {
        Py_XSETREF(c->client_ip, PyBytes_FromStringAndSize("", 0));
    }
    Py_DECREF(peer);
    if (c->client_ip == NULL) return NULL;
    Lane *lane = c->lane;
    c->next = lane->conns;
    if (lane->conns != NULL) lane->conns->prev = c;
    lane->conns = c;
    c->idle_since = mono();
    conn_register(c, 1);
    if (lane->draining) {
        c->closing = 1;
        t_call(transport, s_close);
    }
    Py_RETURN_NONE;
}

/* Give the connection to the Python server protocol for good. */
static void conn_handover(LaneConn *c, PyObject *resume) {
    Lane *lane = c->lane;
    if (c->state == S_HANDED || c->state == S_CLOSED || c->transport == NULL) return;
    lane->handovers++;
    c->state = S_HANDED;
    PyObject *data = PyBytes_FromStringAndSize(c->in.p, c->in.len);
    buf_free(&c->in);
    PyObject *transport = c->transport;
    c->transport = NULL;
    conn_unlink(c);
    if (data == NULL) {
        PyErr_WriteUnraisable((PyObject *)c);
        t_call(transport, s_abort);
        Py_DECREF(transport);
        return;
    }
    Py_INCREF(c);
    conn_register(c, 0);
    if (c->read_paused) {
        c->read_paused = 0;
        t_call(transport, s_resume_reading);
    }
    PyObject *r = PyObject_CallFunction(lane->handover, "OOOOOO", (PyObject *)c, transport, data,
                                        resume ? resume : Py_None, c->eof ? Py_True : Py_False,
                                        c->write_paused ? Py_True : Py_False);
    if (r == NULL) {
        PyErr_WriteUnraisable((PyObject *)c);
        t_call(transport, s_abort);
    }
    Py_XDECREF(r);
    Py_DECREF(data);
    Py_DECREF(transport);
    Py_DECREF(c);
}

/* The attempt failed before the answer started: the Python path carries on with the request
 * (retry or error), told what happened: (route payload, target payload, kind, sent, t_start,
 * t_sent, answer or None). */
static void conn_fail_attempt(LaneConn *c, const char *kind, int sent, PyObject *answer) {
    if (c->state == S_HANDED || c->state == S_CLOSED) return;
    UpConn *u = c->up;
    if (u != NULL) {
        c->up = NULL;
        if (u->client == c) {
            u->client = NULL;
            Py_DECREF(c);
        }
        Py_DECREF(u);
    }
    PyObject *fields = NULL;
    if (c->request != NULL && c->fields_off + c->fields_len <= PyBytes_GET_SIZE(c->request))
        fields = PyBytes_FromStringAndSize(PyBytes_AS_STRING(c->request) + c->fields_off,
                                           c->fields_len);
    else
        fields = PyBytes_FromStringAndSize("", 0);
    if (fields == NULL) {
        PyErr_WriteUnraisable((PyObject *)c);
        conn_abort(c);
        return;
    }
    /* the request-target it sent: "METHOD <target> HTTP/1.1\r\n" before the fields */
    PyObject *target = NULL;
    if (c->request != NULL && c->method != NULL &&
        c->fields_off - 11 > PyBytes_GET_SIZE(c->method) + 1)
        target = PyBytes_FromStringAndSize(
            PyBytes_AS_STRING(c->request) + PyBytes_GET_SIZE(c->method) + 1,
            c->fields_off - 11 - PyBytes_GET_SIZE(c->method) - 1);
    else
        target = Py_NewRef(Py_None);
    if (target == NULL) {
        Py_DECREF(fields);
        PyErr_WriteUnraisable((PyObject *)c);
        conn_abort(c);
        return;
    }
    PyObject *resume = Py_BuildValue(
        "(OOsiddONOOONO)", c->route ? c->route->payload : Py_None,
        c->target ? c->target->payload : Py_None, kind, sent, c->t_start, c->t_sent,
        answer ? answer : Py_None, fields, c->trace_id ? c->trace_id : Py_None,
        c->consumer ? PyTuple_GET_ITEM(c->consumer, 1) : Py_None,
        c->resp_fields ? c->resp_fields : Py_None, target, c->rid ? c->rid : Py_None);
    if (resume == NULL) {
        PyErr_WriteUnraisable((PyObject *)c);
        conn_abort(c);
        return;
    }
    conn_clear_request(c);
    conn_handover(c, resume);
    Py_DECREF(resume);
}

/* Book the exchange with the Python side (done()): the outcome, metrics, the access log
 * (`line`, when the lane wrote it). */
static void conn_book(LaneConn *c, double t_end, PyObject *line) {
    PyObject *r = PyObject_CallFunction(
        c->lane->done, "OOiLddddOOOOOO", c->route->payload, c->target->payload, c->status,
        c->bytes_sent, c->t_start, c->t_sent, c->t_head, t_end,
        c->request_id ? c->request_id : Py_None, c->trace_id ? c->trace_id : Py_None,
        c->method ? c->method : Py_None, c->path ? c->path : Py_None,
        c->consumer ? PyTuple_GET_ITEM(c->consumer, 1) : Py_None, line ? line : Py_None);
    if (r == NULL) PyErr_WriteUnraisable((PyObject *)c);
    Py_XDECREF(r);
}

/* Close the client connection at once (the answer cannot be completed). */
static void conn_abort(LaneConn *c) {
    if (c->state == S_CLOSED || c->state == S_HANDED) return;
    int was = c->state;
    UpConn *u = c->up;
    if (u != NULL) {
        c->up = NULL;
        if (u->client == c) {
            u->client = NULL;
            Py_DECREF(c);
            up_close(u, 1);
        }
        Py_DECREF(u);
    }
    c->state = S_CLOSED;
    c->closing = 1;
    if (c->route != NULL && c->target != NULL &&
        (was == S_SENT || was == S_BODY || was == S_WAIT_CONN)) {
        /* the exchange ends here (a body cut or stalled, a client not reading): booked with
         * the status relayed (0: none yet), as conn_connection_lost books a client leaving */
        conn_book(c, mono(), NULL);
        conn_clear_request(c);
    }
    t_call(c->transport, s_abort);
}

/* A JSON string of bytes read as Latin-1 (what orjson makes of bytes.decode("latin-1")). */
static int buf_json_latin1(Buf *b, const char *s, Py_ssize_t n) {
    if (BUF_LIT(b, "\"") < 0) return -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        char esc[8];
        if (ch == '"' || ch == '\\') {
            esc[0] = '\\';
            esc[1] = (char)ch;
            if (buf_add(b, esc, 2) < 0) return -1;
        } else if (ch < 0x20) {
            int k = snprintf(esc, sizeof esc, "\\u%04x", ch);
            if (ch == '\n') k = snprintf(esc, sizeof esc, "\\n");
            else if (ch == '\r') k = snprintf(esc, sizeof esc, "\\r");
            else if (ch == '\t') k = snprintf(esc, sizeof esc, "\\t");
            else if (ch == '\b') k = snprintf(esc, sizeof esc, "\\b");
            else if (ch == '\f') k = snprintf(esc, sizeof esc, "\\f");
            if (buf_add(b, esc, k) < 0) return -1;
        } else if (ch >= 0x80) {
            esc[0] = (char)(0xc0 | (ch >> 6));
            esc[1] = (char)(0x80 | (ch & 0x3f));
            if (buf_add(b, esc, 2) < 0) return -1;
        } else if (buf_add(b, (const char *)&ch, 1) < 0) {
            return -1;
        }
    }
    return BUF_LIT(b, "\"");
}

/* milliseconds as Python's round(x, 3) prints them: at most 3 decimals, at least one */
static int buf_ms(Buf *b, double seconds) {
    char tmp[48];
    int n = snprintf(tmp, sizeof tmp, "%.3f", seconds * 1000.0);
    while (n > 0 && tmp[n - 1] == '0' && tmp[n - 2] != '.') n--;
    return buf_add(b, tmp, n);
}

static time_t log_second = -1;
static char log_prefix[32]; /* 2026-12-02T17:13:22 */

static Buf logline = {0};

/* The access-log line of a request the lane answered (observe/accesslog.py's fields). */
static PyObject *conn_log_line(LaneConn *c, double t_end) {
    Lane *lane = c->lane;
    Buf *b = &logline;
    b->len = 0;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (ts.tv_sec != log_second) {
        struct tm tm;
        gmtime_r(&ts.tv_sec, &tm);
        strftime(log_prefix, sizeof log_prefix, "%Y-%m-%dT%H:%M:%S", &tm);
        log_second = ts.tv_sec;
    }
    char tmp[64];
    int n = snprintf(tmp, sizeof tmp, "{\"time\":\"%s.%03ldZ\",\"request_id\":", log_prefix,
                     ts.tv_nsec / 1000000);
    if (buf_add(b, tmp, n) < 0) return NULL;
    if (c->request_id != NULL) {
        if (buf_json_latin1(b, PyBytes_AS_STRING(c->request_id), PyBytes_GET_SIZE(c->request_id)) < 0)
            return NULL;
    } else {
        n = snprintf(tmp, sizeof tmp, "\"%s-%llx\"", lane->id_prefix, ++lane->ids);
        if (buf_add(b, tmp, n) < 0) return NULL;
    }
    LaneRoute *r = c->route;
    PyObject *label = c->target->log_label;
    double total = t_end - c->t_start, up = t_end - c->t_sent;
    if (BUF_LIT(b, ",\"route\":") < 0 ||
        buf_add(b, PyBytes_AS_STRING(r->log_head), PyBytes_GET_SIZE(r->log_head)) < 0 ||
        BUF_LIT(b, ",\"consumer\":") < 0)
        return NULL;
    if (c->consumer != NULL && PyTuple_GET_SIZE(c->consumer) > 3) {
        PyObject *j = PyTuple_GET_ITEM(c->consumer, 3);
        if (buf_add(b, PyBytes_AS_STRING(j), PyBytes_GET_SIZE(j)) < 0) return NULL;
    } else if (BUF_LIT(b, "null") < 0) {
        return NULL;
    }
    if (BUF_LIT(b, ",\"method\":\"") < 0 ||
        buf_add(b, PyBytes_AS_STRING(c->method), PyBytes_GET_SIZE(c->method)) < 0 ||
        BUF_LIT(b, "\",\"path\":") < 0 ||
        buf_json_latin1(b, PyBytes_AS_STRING(c->path), PyBytes_GET_SIZE(c->path)) < 0)
        return NULL;
    n = snprintf(tmp, sizeof tmp, ",\"status\":%d,\"bytes\":%lld,\"upstream\":", c->status,
                 c->bytes_sent);
    if (buf_add(b, tmp, n) < 0 ||
        buf_add(b, PyBytes_AS_STRING(r->log_upstream), PyBytes_GET_SIZE(r->log_upstream)) < 0 ||
        BUF_LIT(b, ",\"target\":") < 0 ||
        buf_add(b, PyBytes_AS_STRING(label), PyBytes_GET_SIZE(label)) < 0 ||
        BUF_LIT(b, ",\"attempts\":1,\"tried\":[") < 0 ||
        buf_add(b, PyBytes_AS_STRING(label), PyBytes_GET_SIZE(label)) < 0 ||
        BUF_LIT(b, "],\"cache\":null,\"total_ms\":") < 0 || buf_ms(b, total) < 0 ||
        BUF_LIT(b, ",\"upstream_ms\":") < 0 || buf_ms(b, up) < 0 ||
        BUF_LIT(b, ",\"gateway_ms\":") < 0 || buf_ms(b, total - up) < 0 ||
        BUF_LIT(b, ",\"trace_id\":\"") < 0 ||
        buf_add(b, PyBytes_AS_STRING(c->trace_id), PyBytes_GET_SIZE(c->trace_id)) < 0 ||
        BUF_LIT(b, "\"}\n") < 0)
        return NULL;
    return PyBytes_FromStringAndSize(b->p, b->len);
}

/* The answer is on the wire: book it, then the next request or the close. */
static void conn_finish(LaneConn *c) {
    Lane *lane = c->lane;
    double t_end = mono();
    Py_CLEAR(c->up);
    if (c->route != NULL && c->target != NULL) {
        PyObject *line = NULL;
        if (lane->log_lines && c->method != NULL && c->path != NULL && c->trace_id != NULL) {
            line = conn_log_line(c, t_end);
            if (line == NULL) PyErr_WriteUnraisable((PyObject *)c);
        }
        conn_book(c, t_end, line);
        Py_XDECREF(line);
    }
    conn_clear_request(c);
    buf_consume(&c->in, c->req_len);
    c->req_len = 0;
    if (c->state == S_CLOSED || c->state == S_HANDED) return;
    /* after the client's EOF, requests it pipelined before it are still answered */
    if (!c->keep_alive || lane->draining || c->draining || (c->eof && c->in.len == 0)) {
        /* half-close and read (discarding) until the client closes too, at most LINGER s,
         * so unread bytes of its own do not turn our close into a reset */
        c->state = S_DONE_CLOSE;
        c->closing = 1;
        c->idle_since = t_end;
        PyObject *can = c->eof ? NULL : PyObject_CallMethodNoArgs(c->transport, s_can_write_eof);
        if (can == NULL) PyErr_Clear();
        int ok = can != NULL && PyObject_IsTrue(can) == 1;
        Py_XDECREF(can);
        if (ok) {
            t_call(c->transport, s_write_eof);
            if (c->read_paused) {
                c->read_paused = 0;
                t_call(c->transport, s_resume_reading);
            }
        } else {
            t_call(c->transport, s_close);
        }
        t_call(lane->server, s_check_drained);
        return;
    }
    c->state = S_IDLE;
    c->idle_since = t_end;
    if (c->read_paused) {
        c->read_paused = 0;
        t_call(c->transport, s_resume_reading);
    }
    if (c->in.len > 0) conn_process(c);
    else buf_trim(&c->in);
}

/* ---------------------------------------------------------------------------------------- */
/* the request head                                                                          */

typedef struct {
    const char *method;
    Py_ssize_t method_len;
    const char *target;
    Py_ssize_t target_len;
    const char *path;
    Py_ssize_t path_len;
    int v11;
    const char *host;
    Py_ssize_t host_len;
    int host_count;
    long long content_length;
    const char *connection;
    Py_ssize_t connection_len;
    const char *traceparent;
    const char *xff;          /* the first X-Forwarded-For (several: joined in build) */
    int xff_count, via_count;
    const char *request_id;
    Py_ssize_t request_id_len;
    int idempotency_key;
    Py_ssize_t head_len;
    Py_ssize_t fields_start;
} ReqHead;

enum { P_MORE = 0, P_OK = 1, P_PYTHON = 2 };

static const char *const UP_DROP[] = {
    "connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "host",
    "x-forwarded-proto", "x-forwarded-host", "content-length", "expect", "x-forwarded-for",
    "via", "traceparent", "tracestate", NULL,
};

/* Read a request head from p[0:n] under the lane's strict subset. */
static int parse_request_head(Lane *lane, const char *p, Py_ssize_t n, ReqHead *h) {
    memset(h, 0, sizeof *h);
    h->content_length = -1;
    const char *end = NULL;
    Py_ssize_t limit = n < lane->max_header_bytes + 4 ? n : lane->max_header_bytes + 4;
    for (Py_ssize_t i = 0; i + 3 < limit; i++) {
        const char *q = memchr(p + i, '\r', limit - i - 3);
        if (q == NULL) break;
        if (q[1] == '\n' && q[2] == '\r' && q[3] == '\n') {
            end = q;
            break;
        }
        i = q - p;
    }
    if (end == NULL) return P_MORE;
    /* request line */
    const char *q = p;
    while (q < end && *q >= 'A' && *q <= 'Z') q++;
    h->method = p;
    h->method_len = q - p;
    if (h->method_len == 0 || q >= end || *q != ' ') return P_PYTHON;
    switch (h->method_len) {
    case 3:
        if (memcmp(p, "GET", 3) != 0 && memcmp(p, "PUT", 3) != 0) return P_PYTHON;
        break;
    case 4:
        if (memcmp(p, "HEAD", 4) != 0 && memcmp(p, "POST", 4) != 0) return P_PYTHON;
        break;
    case 5:
        if (memcmp(p, "PATCH", 5) != 0) return P_PYTHON;
        break;
    case 6:
        if (memcmp(p, "DELETE", 6) != 0) return P_PYTHON;
        break;
    case 7:
        if (memcmp(p, "OPTIONS", 7) != 0) return P_PYTHON;
        break;
    default:
        return P_PYTHON;
    }
    q++;
    h->target = q;
    if (*q != '/') return P_PYTHON;
    while (q < end && (unsigned char)*q > 0x20 && (unsigned char)*q < 0x7f) q++;
    h->target_len = q - h->target;
    if (q >= end || *q != ' ') return P_PYTHON;
    q++;
    /* end - q == 8: no header fields, the line's CRLF begins the final CRLFCRLF (HTTP/1.0) */
    if (end - q < 8 || memcmp(q, "HTTP/1.", 7) != 0 || (q[7] != '1' && q[7] != '0') ||
        q[8] != '\r' || q[9] != '\n')
        return P_PYTHON;
    h->v11 = q[7] == '1';
    const char *qm = memchr(h->target, '?', h->target_len);
    h->path = h->target;
    h->path_len = qm ? qm - h->target : h->target_len;
    q += 10;
    h->fields_start = q - p;
    Py_ssize_t count = 0;
    while (q < end + 2) {
        const char *le = memchr(q, '\r', end + 2 - q);
        if (le == NULL || le[1] != '\n') return P_PYTHON;
        if (le == q) break;
        if (++count > lane->max_header_count) return P_PYTHON;
        const char *colon = q;
        while (colon < le && TCHAR[(unsigned char)*colon]) colon++;
        if (colon == q || colon == le || *colon != ':') return P_PYTHON;
        const char *v = colon + 1;
        while (v < le && (*v == ' ' || *v == '\t')) v++;
        const char *ve = le;
        while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t')) ve--;
        for (const char *x = v; x < ve; x++)
            if (!vchar((unsigned char)*x)) return P_PYTHON;
        Py_ssize_t nl = colon - q, vl = ve - v;
        switch (lower((unsigned char)q[0])) {
        case 'h':
            if (ieq(q, nl, "host")) {
                h->host_count++;
                h->host = v;
                h->host_len = vl;
            }
            break;
        case 'c':
            if (ieq(q, nl, "content-length")) {
                if (h->content_length >= 0 || vl == 0 || vl > 18) return P_PYTHON;
                long long cl = 0;
                for (Py_ssize_t i = 0; i < vl; i++) {
                    if (v[i] < '0' || v[i] > '9') return P_PYTHON;
                    cl = cl * 10 + (v[i] - '0');
                }
                h->content_length = cl;
            } else if (ieq(q, nl, "connection")) {
                if (h->connection != NULL || !conn_plain(v, vl)) return P_PYTHON;
                h->connection = v;
                h->connection_len = vl;
            }
            break;
        case 't':
            if (ieq(q, nl, "transfer-encoding") || ieq(q, nl, "tracestate")) return P_PYTHON;
            if (ieq(q, nl, "traceparent")) {
                if (h->traceparent != NULL || vl != 55) return P_PYTHON;
                /* a version other than 00: the Python path (it continues what it can parse) */
                if (v[0] != '0' || v[1] != '0') return P_PYTHON;
                h->traceparent = v;
            }
            break;
        case 'e':
            if (ieq(q, nl, "expect")) return P_PYTHON;
            break;
        case 'u':
            if (ieq(q, nl, "upgrade")) return P_PYTHON;
            break;
        case 'x':
            if (ieq(q, nl, "x-forwarded-for")) h->xff_count++;
            else if (ieq(q, nl, "x-request-id") && h->request_id == NULL) {
                h->request_id = v;
                h->request_id_len = vl;
            }
            break;
        case 'v':
            if (ieq(q, nl, "via")) h->via_count++;
            break;
        case 'i':
            if (ieq(q, nl, "idempotency-key")) h->idempotency_key = 1;
            break;
        }
        q = le + 2;
    }
    if (h->v11 && h->host_count != 1) return P_PYTHON;
    if (!h->v11 && h->host_count > 1) return P_PYTHON;
    h->head_len = (end - p) + 4;
    return P_OK;
}

static int valid_traceparent(const char *v) {
    /* 00-<32 hex>-<16 hex>-<2 hex>, lower-case, ids not all zero, version not ff */
    if (v[2] != '-' || v[35] != '-' || v[52] != '-') return 0;
    for (int i = 0; i < 55; i++) {
        if (i == 2 || i == 35 || i == 52) continue;
        char ch = v[i];
        if (!((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f'))) return 0;
    }
    if (v[0] != '0' || v[1] != '0') return 0; /* other versions: left to the Python path */
    int zero = 1;
    for (int i = 3; i < 35; i++)
        if (v[i] != '0') zero = 0;
    if (zero) return 0;
    zero = 1;
    for (int i = 36; i < 52; i++)
        if (v[i] != '0') zero = 0;
    return !zero;
}

static int is_key_header(LaneRoute *lr, const char *name, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(lr->key_headers); i++)
        if (ieq(name, n, PyBytes_AS_STRING(PyTuple_GET_ITEM(lr->key_headers, i)))) return 1;
    return 0;
}

/* Build the request for the upstream into `out` (gateway/headers.py traced_request_fields). */
static int build_upstream_request(LaneConn *c, const char *p, ReqHead *h, LaneRoute *route,
                                  LaneTarget *target, Buf *out, char *trace_id) {
    Lane *lane = c->lane;
    if (buf_add(out, h->method, h->method_len) < 0 || BUF_LIT(out, " ") < 0) return -1;
    if (buf_add(out, PyBytes_AS_STRING(route->path), PyBytes_GET_SIZE(route->path)) < 0) return -1;
    if (c->hide == HIDE_QUERY) {
        /* the query without the key's parameters (auth.py _without_params) */
        const char *qs = h->path + h->path_len + 1, *qe = h->target + h->target_len;
        Py_ssize_t mark = out->len;
        int first = 1;
        if (BUF_LIT(out, "?") < 0) return -1;
        while (qs <= qe) {
            const char *amp = memchr(qs, '&', qe - qs);
            const char *pe = amp ? amp : qe;
            const char *eq = memchr(qs, '=', pe - qs);
            Py_ssize_t nlen = (eq ? eq : pe) - qs;
            int drop = 0;
            for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(route->key_query); i++) {
                PyObject *name = PyTuple_GET_ITEM(route->key_query, i);
                if (PyBytes_GET_SIZE(name) == nlen && memcmp(PyBytes_AS_STRING(name), qs, nlen) == 0)
                    drop = 1;
            }
            if (!drop) {
                if (!first && BUF_LIT(out, "&") < 0) return -1;
                if (buf_add(out, qs, pe - qs) < 0) return -1;
                first = 0;
            }
            if (amp == NULL) break;
            qs = pe + 1;
        }
        if (out->len == mark + 1) out->len = mark; /* nothing left: no "?" */
    } else if (h->path_len < h->target_len &&
               h->target_len - h->path_len > 1 && /* "?" alone: no query */
               buf_add(out, h->path + h->path_len, h->target_len - h->path_len) < 0) {
        return -1;
    }
    if (BUF_LIT(out, " HTTP/1.1\r\n") < 0) return -1;
    c->fields_off = out->len;
    Buf xff = {0}, via = {0};
    const char *q = p + h->fields_start;
    const char *end = p + h->head_len - 2;
    while (q < end) {
        Field f;
        const char *next = field_at(q, end, &f);
        Py_ssize_t nl = f.nl;
        const char *v = f.v, *ve = f.ve;
        int drop = 0;
        for (int i = 0; UP_DROP[i] != NULL; i++)
            if (ieq(q, nl, UP_DROP[i])) {
                drop = 1;
                break;
            }
        if (drop) {
            if (ieq(q, nl, "x-forwarded-for")) {
                if ((xff.len && BUF_LIT(&xff, ", ") < 0) || buf_add(&xff, v, ve - v) < 0) goto fail;
            } else if (ieq(q, nl, "via")) {
                if ((via.len && BUF_LIT(&via, ", ") < 0) || buf_add(&via, v, ve - v) < 0) goto fail;
            }
        } else if (c->rid_new && ieq(q, nl, PyBytes_AS_STRING(route->rid_header))) {
            /* replaced by the id made here (ctx.set_request_header) */
        } else if (c->hide == HIDE_AUTHORIZATION && ieq(q, nl, "authorization")) {
            /* the bearer key stays here */
        } else if (c->hide == HIDE_HEADERS && is_key_header(route, q, nl)) {
            /* the key's header(s) stay here */
        } else if (!(nl >= 6 && ieq(q, 6, "proxy-"))) {
            if (buf_add_field(out, q, nl, v, ve - v) < 0) goto fail;
        }
        q = next;
    }
    if (c->rid_new &&
        buf_add_field(out, PyBytes_AS_STRING(route->rid_header), PyBytes_GET_SIZE(route->rid_header),
                      PyBytes_AS_STRING(c->rid), PyBytes_GET_SIZE(c->rid)) < 0)
        goto fail;
    if (c->consumer != NULL) { /* key_auth's consumer, as grant() tells the upstream */
        PyObject *f = PyTuple_GET_ITEM(c->consumer, 2);
        if (buf_add(out, PyBytes_AS_STRING(f), PyBytes_GET_SIZE(f)) < 0) goto fail;
    }
    /* host */
    if (BUF_LIT(out, "host: ") < 0) goto fail;
    if (route->host_target || (route->host == Py_None && h->host_len == 0)) {
        if (buf_add(out, PyBytes_AS_STRING(target->authority), PyBytes_GET_SIZE(target->authority)) < 0)
            goto fail;
    } else if (route->host == Py_None) {
        if (buf_add(out, h->host, h->host_len) < 0) goto fail;
    } else if (buf_add(out, PyBytes_AS_STRING(route->host), PyBytes_GET_SIZE(route->host)) < 0) {
        goto fail;
    }
    if (BUF_LIT(out, "\r\nx-forwarded-for: ") < 0) goto fail;
    if (xff.len && (buf_add(out, xff.p, xff.len) < 0 || BUF_LIT(out, ", ") < 0)) goto fail;
    if (buf_add(out, PyBytes_AS_STRING(c->client_ip), PyBytes_GET_SIZE(c->client_ip)) < 0 ||
        BUF_LIT(out, "\r\nx-forwarded-proto: http\r\n") < 0)
        goto fail;
    if (h->host_len > 0 && (BUF_LIT(out, "x-forwarded-host: ") < 0 ||
                            buf_add(out, h->host, h->host_len) < 0 || BUF_LIT(out, "\r\n") < 0))
        goto fail;
    if (BUF_LIT(out, "via: ") < 0) goto fail;
    if (via.len && (buf_add(out, via.p, via.len) < 0 || BUF_LIT(out, ", ") < 0)) goto fail;
    if (buf_add(out, PyBytes_AS_STRING(lane->via), PyBytes_GET_SIZE(lane->via)) < 0) goto fail;
    /* trace context: continue a valid one, else start one */
    char span[16];
    hex64(span, rng_next() | 1);
    int sampled;
    if (h->traceparent != NULL && valid_traceparent(h->traceparent)) {
        memcpy(trace_id, h->traceparent + 3, 32);
        int flags = (h->traceparent[53] <= '9' ? h->traceparent[53] - '0' : h->traceparent[53] - 'a' + 10) * 16 +
                    (h->traceparent[54] <= '9' ? h->traceparent[54] - '0' : h->traceparent[54] - 'a' + 10);
        sampled = flags & 1;
    } else {
        hex64(trace_id, rng_next());
        hex64(trace_id + 16, rng_next());
        double ratio = lane->sample_ratio;
        sampled = ratio >= 1.0 || (ratio > 0.0 && (double)(rng_next() >> 11) * 0x1.0p-53 < ratio);
    }
    if (BUF_LIT(out, "\r\ntraceparent: 00-") < 0 || buf_add(out, trace_id, 32) < 0 ||
        BUF_LIT(out, "-") < 0 || buf_add(out, span, 16) < 0 ||
        buf_add(out, sampled ? "-01\r\n" : "-00\r\n", 5) < 0)
        goto fail;
    c->fields_len = out->len - c->fields_off;
    if (h->content_length > 0) {
        if (BUF_LIT(out, "content-length: ") < 0 || buf_add_dec(out, h->content_length) < 0 ||
            BUF_LIT(out, "\r\n") < 0)
            goto fail;
    } else if ((h->method_len == 4 && memcmp(h->method, "POST", 4) == 0) ||
               (h->method_len == 3 && memcmp(h->method, "PUT", 3) == 0) ||
               (h->method_len == 5 && memcmp(h->method, "PATCH", 5) == 0)) {
        /* an empty body of a method that has one: said so, as http1.client does */
        if (BUF_LIT(out, "content-length: 0\r\n") < 0) goto fail;
    }
    if (BUF_LIT(out, "\r\n") < 0) goto fail;
    if (h->content_length > 0 && buf_add(out, p + h->head_len, h->content_length) < 0) goto fail;
    buf_free(&xff);
    buf_free(&via);
    return 0;
fail:
    buf_free(&xff);
    buf_free(&via);
    return -1;
}

/* key_auth: find the API key the way gateway/plugins/auth.py does (the first configured
 * header present with a value, else Authorization: Bearer, else a query parameter).
 * 1: found; 0: none, or a case the Python path must see (identity headers a client sent, an
 * encoded query value). */
static int find_key(LaneRoute *lr, const char *p, ReqHead *h, const char **key, Py_ssize_t *klen,
                    int *where) {
    Py_ssize_t nkeys = PyTuple_GET_SIZE(lr->key_headers);
    Py_ssize_t best = nkeys;
    const char *auth = NULL;
    Py_ssize_t auth_len = 0;
    const char *q = p + h->fields_start;
    const char *end = p + h->head_len - 2;
    *key = NULL;
    while (q < end) {
        Field f;
        const char *next = field_at(q, end, &f);
        Py_ssize_t nl = f.nl;
        const char *v = f.v, *ve = f.ve;
        for (Py_ssize_t i = 0; i < best; i++) {
            PyObject *name = PyTuple_GET_ITEM(lr->key_headers, i);
            if (ieq(q, nl, PyBytes_AS_STRING(name))) {
                if (ve > v) {
                    best = i;
                    *key = v;
                    *klen = ve - v;
                }
                break;
            }
        }
        if (ieq(q, nl, "authorization")) {
            if (auth == NULL) {
                auth = v;
                auth_len = ve - v;
            }
        } else if ((nl >= 11 && ieq(q, 11, "x-consumer-")) ||
                   ieq(q, nl, "x-credential-identifier") || ieq(q, nl, "x-anonymous-consumer")) {
            return 0;
        }
        q = next;
    }
    if (*key != NULL) {
        *where = HIDE_HEADERS;
        return 1;
    }
    if (lr->key_bearer && auth != NULL && auth_len > 7 && ieq(auth, 7, "bearer ")) {
        const char *t = auth + 7, *te = auth + auth_len;
        while (t < te && (*t == ' ' || *t == '\t' || *t == '\v' || *t == '\f')) t++;
        if (t < te) {
            *key = t;
            *klen = te - t;
            *where = HIDE_AUTHORIZATION;
            return 1;
        }
    }
    if (PyTuple_GET_SIZE(lr->key_query) > 0 && h->path_len < h->target_len) {
        const char *qs = h->path + h->path_len + 1, *qe = h->target + h->target_len;
        while (qs < qe) {
            const char *amp = memchr(qs, '&', qe - qs);
            const char *pe = amp ? amp : qe;
            const char *eq = memchr(qs, '=', pe - qs);
            if (eq != NULL && eq + 1 < pe) {
                for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(lr->key_query); i++) {
                    PyObject *name = PyTuple_GET_ITEM(lr->key_query, i);
                    if (PyBytes_GET_SIZE(name) == eq - qs &&
                        memcmp(PyBytes_AS_STRING(name), qs, eq - qs) == 0) {
                        for (const char *x = eq + 1; x < pe; x++)
                            if (*x == '%' || *x == '+') return 0; /* decoding: the Python path */
                        *key = eq + 1;
                        *klen = pe - eq - 1;
                        *where = HIDE_QUERY;
                        return 1;
                    }
                }
            }
            qs = pe + 1;
        }
    }
    return 0;
}

/* request_id (gateway/plugins/transform.py): keep a sane incoming id (1-200 visible ASCII)
 * when trusted, else make one (uuid4 hex). */
static int conn_request_id(LaneConn *c, LaneRoute *lr, const char *p, ReqHead *h) {
    const char *name = PyBytes_AS_STRING(lr->rid_header);
    const char *found = NULL;
    Py_ssize_t flen = 0;
    if (lr->rid_trust) {
        const char *q = p + h->fields_start, *end = p + h->head_len - 2;
        while (q < end) {
            Field f;
            const char *next = field_at(q, end, &f);
            if (ieq(q, f.nl, name)) {
                found = f.v;
                flen = f.ve - f.v;
                break;
            }
            q = next;
        }
    }
    int sane = found != NULL && flen >= 1 && flen <= 200;
    for (Py_ssize_t i = 0; sane && i < flen; i++)
        if ((unsigned char)found[i] < 0x21 || (unsigned char)found[i] > 0x7e) sane = 0;
    if (sane) {
        Py_XSETREF(c->rid, PyBytes_FromStringAndSize(found, flen));
        c->rid_new = 0;
    } else {
        uint64_t hi = rng_next(), lo = rng_next();
        hi = (hi & ~0xf000ULL) | 0x4000ULL;                                     /* version 4 */
        lo = (lo & 0x3fffffffffffffffULL) | 0x8000000000000000ULL;              /* variant */
        char hex[32];
        hex64(hex, hi);
        hex64(hex + 16, lo);
        Py_XSETREF(c->rid, PyBytes_FromStringAndSize(hex, 32));
        c->rid_new = 1;
    }
    return c->rid == NULL ? -1 : 0;
}

/* The access phase of a route with policies. 1: go on; 0: the Python path answers (no key,
 * an unknown one, a refusal); -1: error. */
static int conn_access(LaneConn *c, LaneRoute *lr, const char *p, ReqHead *h) {
    PyObject *name = Py_None;
    if (lr->keys != NULL) {
        const char *key;
        Py_ssize_t klen;
        int where = HIDE_NONE;
        if (!find_key(lr, p, h, &key, &klen, &where)) return 0;
        unsigned char digest[32];
        sha256((const unsigned char *)key, (size_t)klen, digest);
        PyObject *d = PyBytes_FromStringAndSize((const char *)digest, 32);
        if (d == NULL) return -1;
        PyObject *entry = PyDict_GetItemWithError(lr->keys, d);
        Py_DECREF(d);
        if (entry == NULL) return PyErr_Occurred() ? -1 : 0;
        if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) < 3 ||
            !PyBytes_Check(PyTuple_GET_ITEM(entry, 0)) ||
            PyBytes_GET_SIZE(PyTuple_GET_ITEM(entry, 0)) != 32 ||
            !PyBytes_Check(PyTuple_GET_ITEM(entry, 2))) {
            PyErr_SetString(PyExc_TypeError, "keys: digest -> (digest, name, fields) expected");
            return -1;
        }
        /* the stored digest compared in constant time (hmac.compare_digest's way) */
        const unsigned char *stored = (const unsigned char *)PyBytes_AS_STRING(PyTuple_GET_ITEM(entry, 0));
        unsigned char diff = 0;
        for (int i = 0; i < 32; i++) diff |= stored[i] ^ digest[i];
        if (diff != 0) return 0;
        Py_INCREF(entry);
        Py_XSETREF(c->consumer, entry);
        c->hide = lr->key_hide ? where : HIDE_NONE;
        name = PyTuple_GET_ITEM(entry, 1);
    }
    if (lr->access != NULL) {
        PyObject *r = PyObject_CallFunctionObjArgs(lr->access, name, c->client_ip, NULL);
        if (r == NULL) return -1;
        if (r == Py_None) {
            Py_DECREF(r);
            return 0;
        }
        if (!PyBytes_Check(r)) {
            Py_DECREF(r);
            PyErr_SetString(PyExc_TypeError, "access() must return bytes or None");
            return -1;
        }
        Py_XSETREF(c->resp_fields, r);
    }
    return 1;
}

/* Send the request on `u` (a new reference is taken). */
static void conn_send(LaneConn *c, UpConn *u) {
    if (c->state != S_WAIT_CONN || c->request == NULL || c->transport == NULL) {
        /* the client went away meanwhile: the connection goes back to the pool */
        Py_INCREF(u);
        u->client = NULL;
        u->keep_alive = 1;
        up_release(u);
        Py_DECREF(u);
        return;
    }
    Py_INCREF(u);
    Py_XSETREF(c->up, u);
    Py_INCREF(c);
    Py_XSETREF(u->client, c);
    up_reset_response(u);
    c->state = S_SENT;
    c->t_sent = mono();
    PyObject *r = PyObject_CallMethodOneArg(u->transport, s_write, c->request);
    if (r == NULL) {
        PyErr_Clear();
        up_close(u, 1);
        conn_fail_attempt(c, "reset", 0, NULL);
        return;
    }
    Py_DECREF(r);
}

/* Parse and dispatch the next request in c->in, or hand the connection over. */
static void conn_process(LaneConn *c) {
    Lane *lane = c->lane;
    if (c->state != S_IDLE || c->in.len == 0) return;
    ReqHead h;
    int r = parse_request_head(lane, c->in.p, c->in.len, &h);
    if (r != P_OK) { /* partial or unusual: the Python path reads it (with its timers) */
        conn_handover(c, NULL);
        return;
    }
    long long body = h.content_length > 0 ? h.content_length : 0;
    if (body > lane->max_body_bytes || h.head_len + body > c->in.len) {
        conn_handover(c, NULL);
        return;
    }
    /* the route, from the cache or the Python side */
    Py_ssize_t klen = h.method_len + 1 + h.host_len + 1 + h.path_len;
    PyObject *key = PyBytes_FromStringAndSize(NULL, klen);
    if (key == NULL) goto error;
    char *k = PyBytes_AS_STRING(key);
    memcpy(k, h.method, h.method_len);
    k[h.method_len] = 0;
    memcpy(k + h.method_len + 1, h.host, h.host_len);
    k[h.method_len + 1 + h.host_len] = 0;
    memcpy(k + h.method_len + 2 + h.host_len, h.path, h.path_len);
    PyObject *route = PyDict_GetItemWithError(lane->cache, key);
    if (route == NULL) {
        if (PyErr_Occurred()) {
            Py_DECREF(key);
            goto error;
        }
        route = PyObject_CallFunction(lane->resolve, "y#y#y#", h.method, h.method_len,
                                      h.host ? h.host : "", h.host_len, h.path, h.path_len);
        if (route == NULL) {
            Py_DECREF(key);
            goto error;
        }
        if (route != Py_None && !PyObject_TypeCheck(route, &LaneRouteType)) {
            Py_DECREF(route);
            Py_DECREF(key);
            PyErr_SetString(PyExc_TypeError, "resolve() must return a LaneRoute or None");
            goto error;
        }
        if (PyDict_GET_SIZE(lane->cache) >= lane->max_cache) PyDict_Clear(lane->cache);
        if (PyDict_SetItem(lane->cache, key, route) < 0) {
            Py_DECREF(route);
            Py_DECREF(key);
            goto error;
        }
        Py_DECREF(route); /* the cache holds it */
    }
    Py_DECREF(key);
    if (route == Py_None) {
        conn_handover(c, NULL);
        return;
    }
    LaneRoute *lr = (LaneRoute *)route;
    if (body > lr->max_body_bytes) {
        conn_handover(c, NULL);
        return;
    }
    Py_INCREF(lr);
    Py_XSETREF(c->route, lr); /* owned from here: a reload may clear the cache */
    if (lr->rid_header != NULL && conn_request_id(c, lr, c->in.p, &h) < 0) goto error;
    if (lr->keys != NULL || lr->access != NULL) {
        int ok = conn_access(c, lr, c->in.p, &h);
        if (ok < 0) goto error;
        if (ok == 0) {
            conn_clear_request(c);
            conn_handover(c, NULL);
            return;
        }
    }
    if (lr->rid_header != NULL && lr->rid_echo) {
        /* request_id ran first: its echo comes before the other response fields */
        Buf echo = {0};
        int bad = buf_add_field(&echo, PyBytes_AS_STRING(lr->rid_header),
                                PyBytes_GET_SIZE(lr->rid_header), PyBytes_AS_STRING(c->rid),
                                PyBytes_GET_SIZE(c->rid)) < 0 ||
                  (c->resp_fields != NULL &&
                   buf_add(&echo, PyBytes_AS_STRING(c->resp_fields),
                           PyBytes_GET_SIZE(c->resp_fields)) < 0);
        if (!bad) Py_XSETREF(c->resp_fields, PyBytes_FromStringAndSize(echo.p, echo.len));
        buf_free(&echo);
        if (bad || c->resp_fields == NULL) goto error;
    }
    /* the target: the Python side picks and books the attempt */
    PyObject *t = PyObject_CallOneArg(lane->pick, route);
    if (t == NULL) goto error;
    if (t == Py_None) {
        Py_DECREF(t);
        conn_clear_request(c);
        conn_handover(c, NULL);
        return;
    }
    if (!PyObject_TypeCheck(t, &LaneTargetType)) {
        Py_DECREF(t);
        PyErr_SetString(PyExc_TypeError, "pick() must return a LaneTarget or None");
        goto error;
    }
    LaneTarget *target = (LaneTarget *)t;
    c->t_start = mono();
    lane->requests++;
    Py_XSETREF(c->target, target); /* takes pick()'s reference */
    c->req_len = h.head_len + body;
    c->v11 = h.v11;
    c->keep_alive = h.v11 ? !(h.connection && conn_names(h.connection, h.connection_len, "close", 5))
                          : (h.connection && conn_names(h.connection, h.connection_len, "keep-alive", 10));
    c->is_head = h.method_len == 4 && memcmp(h.method, "HEAD", 4) == 0;
    c->idempotent = !((h.method_len == 4 && memcmp(h.method, "POST", 4) == 0) ||
                      (h.method_len == 5 && memcmp(h.method, "PATCH", 5) == 0)) ||
                    h.idempotency_key;
    c->retried = 0;
    c->status = 0;
    c->bytes_sent = 0;
    char trace_id[32];
    wire.len = 0;
    if (build_upstream_request(c, c->in.p, &h, lr, target, &wire, trace_id) < 0) goto error;
    Py_XSETREF(c->request, PyBytes_FromStringAndSize(wire.p, wire.len));
    Py_XSETREF(c->method, PyBytes_FromStringAndSize(h.method, h.method_len));
    Py_XSETREF(c->path, PyBytes_FromStringAndSize(h.path, h.path_len));
    Py_XSETREF(c->trace_id, PyBytes_FromStringAndSize(trace_id, 32));
    if (c->rid != NULL) /* request_id's, for the access log as ctx.request_id */
        Py_XSETREF(c->request_id, Py_NewRef(c->rid));
    else if (h.request_id != NULL)
        Py_XSETREF(c->request_id, PyBytes_FromStringAndSize(h.request_id, h.request_id_len));
    else
        Py_CLEAR(c->request_id);
    if (c->request == NULL || c->method == NULL || c->path == NULL || c->trace_id == NULL) goto error;
    c->state = S_WAIT_CONN;
    /* a pooled connection, or a new one */
    if (target->n_idle > 0) {
        UpConn *u = target->idle[--target->n_idle];
        conn_send(c, u);
        Py_DECREF(u);
        return;
    }
    int room = target_room(target);
    if (room < 0) goto error;
    if (room == 0) {
        /* every connection busy: the Python path queues it (max_pending, pool timeout) */
        conn_fail_attempt(c, "busy", 0, NULL);
        return;
    }
    if (target_push_waiting(target, c) < 0) goto error;
    target->conns++;
    PyObject *res = PyObject_CallOneArg(lane->connect, (PyObject *)target);
    if (res == NULL) {
        target->conns--;
        goto error;
    }
    Py_DECREF(res);
    return;
error:
    PyErr_WriteUnraisable((PyObject *)c);
    if (c->state == S_IDLE) {
        conn_clear_request(c);
        conn_handover(c, NULL);
    } else {
        conn_fail_attempt(c, "internal", 0, NULL);
    }
}

static PyObject *conn_data_received(LaneConn *c, PyObject *data) {
    char *d;
    Py_ssize_t n;
    if (PyBytes_AsStringAndSize(data, &d, &n) < 0) return NULL;
    if (c->state == S_HANDED || c->state == S_CLOSED || c->state == S_DONE_CLOSE) Py_RETURN_NONE;
    if (buf_add(&c->in, d, n) < 0) return NULL;
    if (c->state != S_IDLE) {
        /* pipelined bytes while an answer is on its way: kept, reading paused past a bound */
        if (c->in.len - c->req_len > 65536 && !c->read_paused) {
            c->read_paused = 1;
            t_call(c->transport, s_pause_reading);
        }
        Py_RETURN_NONE;
    }
    conn_process(c);
    Py_RETURN_NONE;
}

static PyObject *conn_eof_received(LaneConn *c, PyObject *unused) {
    c->eof = 1;
    if (c->state == S_IDLE) {
        if (c->in.len > 0) { /* a partial request, then EOF: the Python path answers it */
            conn_handover(c, NULL);
            Py_RETURN_TRUE;
        }
        c->closing = 1;
        Py_RETURN_FALSE;
    }
    if (c->state == S_WAIT_CONN || c->state == S_SENT || c->state == S_BODY) Py_RETURN_TRUE;
    Py_RETURN_FALSE; /* lingering or closed: the transport closes */
}

static PyObject *conn_connection_lost(LaneConn *c, PyObject *exc) {
    int was = c->state;
    if (was != S_HANDED) {
        c->state = S_CLOSED;
        c->closing = 1;
        UpConn *u = c->up;
        if (u != NULL) {
            c->up = NULL;
            if (u->client == c) {
                /* the client left mid-exchange: the upstream answer is not wanted */
                u->client = NULL;
                Py_DECREF(c);
                up_close(u, 1);
            }
            Py_DECREF(u);
        }
        if (c->route != NULL && c->target != NULL && (was == S_SENT || was == S_BODY || was == S_WAIT_CONN)) {
            /* booked as abandoned: status 0 */
            c->status = 0;
            conn_book(c, mono(), NULL);
        }
        conn_clear_request(c);
        conn_unlink(c);
        conn_register(c, 0);
    }
    Py_CLEAR(c->transport);
    buf_free(&c->in);
    Py_RETURN_NONE;
}

static PyObject *conn_pause_writing(LaneConn *c, PyObject *unused) {
    c->write_paused = 1;
    c->write_paused_since = mono();
    UpConn *u = c->up;
    if (u != NULL && !u->paused && u->transport != NULL) {
        u->paused = 1;
        t_call(u->transport, s_pause_reading);
    }
    Py_RETURN_NONE;
}

static PyObject *conn_resume_writing(LaneConn *c, PyObject *unused) {
    c->write_paused = 0;
    UpConn *u = c->up;
    if (u != NULL && u->paused && u->transport != NULL) {
        u->paused = 0;
        t_call(u->transport, s_resume_reading);
    }
    Py_RETURN_NONE;
}

/* server.close_listeners() calls this: idle connections close now, busy ones after the answer */
static PyObject *conn_drain_now(LaneConn *c, PyObject *unused) {
    c->draining = 1;
    if (c->state == S_IDLE && c->in.len == 0 && !c->closing && c->transport != NULL) {
        c->closing = 1;
        c->state = S_DONE_CLOSE;
        t_call(c->transport, s_close);
    }
    Py_RETURN_NONE;
}

static PyMethodDef conn_methods[] = {
    {"connection_made", (PyCFunction)conn_connection_made, METH_O, NULL},
    {"data_received", (PyCFunction)conn_data_received, METH_O, NULL},
    {"eof_received", (PyCFunction)conn_eof_received, METH_NOARGS, NULL},
    {"connection_lost", (PyCFunction)conn_connection_lost, METH_O, NULL},
    {"pause_writing", (PyCFunction)conn_pause_writing, METH_NOARGS, NULL},
    {"resume_writing", (PyCFunction)conn_resume_writing, METH_NOARGS, NULL},
    {"_drain_now", (PyCFunction)conn_drain_now, METH_NOARGS, NULL},
    {NULL},
};

static PyMemberDef conn_members[] = {
    {"_closing", T_BOOL, offsetof(LaneConn, closing), 0, NULL},
    {"_transport", T_OBJECT, offsetof(LaneConn, transport), READONLY, NULL},
    {NULL},
};

static PyTypeObject LaneConnType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "piuptime.gateway._lane.LaneConn",
    .tp_doc = "The lane's protocol on one client connection.",
    .tp_basicsize = sizeof(LaneConn),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = conn_new,
    .tp_dealloc = (destructor)conn_dealloc,
    .tp_traverse = (traverseproc)conn_traverse,
    .tp_clear = (inquiry)conn_clear,
    .tp_methods = conn_methods,
    .tp_members = conn_members,
};

/* ---------------------------------------------------------------------------------------- */
/* Lane                                                                                      */

static int lane_init(Lane *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"resolve", "pick", "done", "connect", "handover", "server", "via",
                             "max_header_bytes", "max_header_count", "max_body_bytes",
                             "idle_timeout", "write_timeout", NULL};
    PyObject *resolve, *pick, *done, *connect, *handover, *server, *via;
    Py_ssize_t mhb, mhc, mbb;
    double idle, wt;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOOOSnnndd", kwlist, &resolve, &pick, &done,
                                     &connect, &handover, &server, &via, &mhb, &mhc, &mbb, &idle,
                                     &wt))
        return -1;
    Py_INCREF(resolve);
    Py_XSETREF(self->resolve, resolve);
    Py_INCREF(pick);
    Py_XSETREF(self->pick, pick);
    Py_INCREF(done);
    Py_XSETREF(self->done, done);
    Py_INCREF(connect);
    Py_XSETREF(self->connect, connect);
    Py_INCREF(handover);
    Py_XSETREF(self->handover, handover);
    Py_INCREF(server);
    Py_XSETREF(self->server, server);
    Py_INCREF(via);
    Py_XSETREF(self->via, via);
    Py_XSETREF(self->cache, PyDict_New());
    if (self->cache == NULL) return -1;
    self->max_header_bytes = mhb;
    self->max_header_count = mhc;
    self->max_body_bytes = mbb;
    self->max_cache = 4096;
    self->idle_timeout = idle;
    self->write_timeout = wt;
    for (int i = 0; i < 12; i++) self->id_prefix[i] = HEX[rng_next() & 15];
    self->id_prefix[12] = 0;
    return 0;
}

static int lane_traverse(Lane *self, visitproc visit, void *arg) {
    Py_VISIT(self->resolve);
    Py_VISIT(self->pick);
    Py_VISIT(self->done);
    Py_VISIT(self->connect);
    Py_VISIT(self->handover);
    Py_VISIT(self->server);
    Py_VISIT(self->cache);
    Py_VISIT(self->via);
    return 0;
}

static int lane_clear(Lane *self) {
    Py_CLEAR(self->resolve);
    Py_CLEAR(self->pick);
    Py_CLEAR(self->done);
    Py_CLEAR(self->connect);
    Py_CLEAR(self->handover);
    Py_CLEAR(self->server);
    Py_CLEAR(self->cache);
    Py_CLEAR(self->via);
    return 0;
}

static void lane_dealloc(Lane *self) {
    PyObject_GC_UnTrack(self);
    lane_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* lane.reset(resolve, via): a new configuration; the route cache starts empty */
static PyObject *lane_reset(Lane *self, PyObject *args) {
    PyObject *resolve, *via;
    if (!PyArg_ParseTuple(args, "OS", &resolve, &via)) return NULL;
    Py_INCREF(resolve);
    Py_XSETREF(self->resolve, resolve);
    Py_INCREF(via);
    Py_XSETREF(self->via, via);
    PyDict_Clear(self->cache);
    Py_RETURN_NONE;
}

/* lane.sweep(): close keep-alive connections idle past the idle timeout and clients that
 * stopped reading an answer for the write timeout; returns the live connection count. */
static PyObject *lane_sweep(Lane *self, PyObject *unused) {
    double now = mono();
    Py_ssize_t live = 0;
    LaneConn *c = self->conns;
    while (c != NULL) {
        LaneConn *next = c->next;
        live++;
        /* no request forwarded yet (t_start unset): the header timeout, as http1.server */
        double wait = c->t_start == 0.0 && self->header_timeout > 0 ? self->header_timeout
                                                                    : self->idle_timeout;
        if (c->state == S_IDLE && c->in.len == 0 && !c->closing && now - c->idle_since > wait) {
            c->closing = 1;
            c->state = S_DONE_CLOSE;
            t_call(c->transport, s_close);
        } else if (c->write_paused && now - c->write_paused_since > self->write_timeout) {
            Py_INCREF(c);
            conn_abort(c);
            Py_DECREF(c);
        } else if (c->state == S_SENT && c->route != NULL &&
                   ((c->route->ttfb_timeout > 0 && now - c->t_sent > c->route->ttfb_timeout) ||
                    now - c->t_start > c->route->total_timeout)) {
            /* no answer in time: the attempt failed; the Python path decides what follows */
            Py_INCREF(c);
            UpConn *u = c->up;
            if (u != NULL) up_close(u, 1);
            conn_fail_attempt(c, "timeout", 1, NULL);
            Py_DECREF(c);
        } else if (c->state == S_BODY && c->up != NULL && c->route != NULL &&
                   c->route->read_timeout > 0 && !c->write_paused &&
                   now - c->last_read > c->route->read_timeout) {
            /* the body stalled: a gap longer than the read timeout */
            Py_INCREF(c);
            if (c->up->collecting) {
                up_close(c->up, 1);
                conn_fail_attempt(c, "timeout", 1, NULL);
            } else {
                conn_abort(c);
            }
            Py_DECREF(c);
        } else if (c->state == S_DONE_CLOSE && now - c->idle_since > LINGER_SECONDS &&
                   c->transport != NULL) {
            t_call(c->transport, s_close);
        }
        c = next;
    }
    return PyLong_FromSsize_t(live);
}

static PyObject *lane_drain(Lane *self, PyObject *unused) {
    self->draining = 1;
    Py_RETURN_NONE;
}

static PyMethodDef lane_methods[] = {
    {"reset", (PyCFunction)lane_reset, METH_VARARGS, NULL},
    {"sweep", (PyCFunction)lane_sweep, METH_NOARGS, NULL},
    {"drain", (PyCFunction)lane_drain, METH_NOARGS, NULL},
    {NULL},
};

static PyMemberDef lane_members[] = {
    {"sample_ratio", T_DOUBLE, offsetof(Lane, sample_ratio), 0, NULL},
    {"log_lines", T_BOOL, offsetof(Lane, log_lines), 0, NULL},
    {"idle_timeout", T_DOUBLE, offsetof(Lane, idle_timeout), 0, NULL},
    {"write_timeout", T_DOUBLE, offsetof(Lane, write_timeout), 0, NULL},
    {"header_timeout", T_DOUBLE, offsetof(Lane, header_timeout), 0, NULL},
    {"max_header_bytes", T_PYSSIZET, offsetof(Lane, max_header_bytes), 0, NULL},
    {"max_header_count", T_PYSSIZET, offsetof(Lane, max_header_count), 0, NULL},
    {"max_body_bytes", T_PYSSIZET, offsetof(Lane, max_body_bytes), 0, NULL},
    {"requests", T_ULONGLONG, offsetof(Lane, requests), READONLY, NULL},
    {"handovers", T_ULONGLONG, offsetof(Lane, handovers), READONLY, NULL},
    {NULL},
};

static PyTypeObject LaneType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "piuptime.gateway._lane.Lane",
    .tp_doc = "The fast lane of one listener: settings, the route cache and the callbacks.",
    .tp_basicsize = sizeof(Lane),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)lane_init,
    .tp_dealloc = (destructor)lane_dealloc,
    .tp_traverse = (traverseproc)lane_traverse,
    .tp_clear = (inquiry)lane_clear,
    .tp_methods = lane_methods,
    .tp_members = lane_members,
};

/* ---------------------------------------------------------------------------------------- */
/* module                                                                                    */

static struct PyModuleDef lanemodule = {
    PyModuleDef_HEAD_INIT, "_lane", "The fast lane: the common proxied request in C.", -1, NULL,
};

#define INTERN(var, text)                                   \
    do {                                                    \
        var = PyUnicode_InternFromString(text);             \
        if (var == NULL) return NULL;                       \
    } while (0)

PyMODINIT_FUNC PyInit__lane(void) {
    INTERN(s_write, "write");
    INTERN(s_close, "close");
    INTERN(s_abort, "abort");
    INTERN(s_pause_reading, "pause_reading");
    INTERN(s_resume_reading, "resume_reading");
    INTERN(s_get_extra_info, "get_extra_info");
    INTERN(s_peername, "peername");
    INTERN(s_connections, "_connections");
    INTERN(s_check_drained, "_check_drained");
    INTERN(s_add, "add");
    INTERN(s_discard, "discard");
    INTERN(s_can_write_eof, "can_write_eof");
    INTERN(s_write_eof, "write_eof");
    if (!sha256_selftest()) {
        PyErr_SetString(PyExc_ImportError, "the lane's SHA-256 failed its self-test");
        return NULL;
    }
    PyObject *os = PyImport_ImportModule("os");
    if (os == NULL) return NULL;
    PyObject *seed = PyObject_CallMethod(os, "urandom", "i", 32);
    Py_DECREF(os);
    if (seed == NULL) return NULL;
    memcpy(rng_s, PyBytes_AS_STRING(seed), 32);
    Py_DECREF(seed);
    if ((rng_s[0] | rng_s[1] | rng_s[2] | rng_s[3]) == 0) rng_s[0] = 1;
    PyTypeObject *types[] = {&LaneType, &LaneConnType, &UpConnType, &LaneTargetType,
                             &LaneRouteType};
    const char *names[] = {"Lane", "LaneConn", "UpConn", "LaneTarget", "LaneRoute"};
    PyObject *m = PyModule_Create(&lanemodule);
    if (m == NULL) return NULL;
    for (int i = 0; i < 5; i++) {
        if (PyType_Ready(types[i]) < 0) return NULL;
        Py_INCREF(types[i]);
        if (PyModule_AddObject(m, names[i], (PyObject *)types[i]) < 0) return NULL;
    }
    return m;
}
