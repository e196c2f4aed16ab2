/* collab._fastscan: the no-graph scan of collab.updates._scan_update, in C.
 *
 * scan(data: bytes, max_depth: int) -> bool checks one Yjs v1 update exactly as
 * ``_scan_update(data, max_depth, None)`` does (see collab/updates.py for the format and every
 * limit): it returns False for a valid update, True where the Python scan raises _NeedGraph
 * (more type items than max_depth: the caller runs the Python graph scan), and raises
 * InvalidUpdate with the Python scan's message otherwise (a read past the end, an IndexError
 * in Python, raises InvalidUpdate("truncated"), as validate_update does).
 *
 * Every helper mirrors the Python function of the same name, check for check, in the same
 * order, so that the first error met (and so the message) is the same. Integers are uint64:
 * varUints are at most 2**53 - 1 and every sum or product below stays under 2**56. Nesting is
 * followed with explicit stacks, never C recursion. JSON texts (Format / Embed / JSON content)
 * are settled here when they are plainly valid JSON of depth <= 64 (the shapes Yjs writes) or
 * certainly nested deeper than max_depth; anything else (invalid JSON, deeper valid JSON,
 * integers of more than 600 digits) is handed to the Python ``_check_json`` given to init(), so
 * the verdict is always the Python one.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <limits.h>
#include <stdint.h>
#include <string.h>

#define MAX_SAFE_INTEGER ((UINT64_C(1) << 53) - 1)
#define MAX_CLOCK UINT64_C(0xFFFFFFFF)
#define MAX_TYPE_REF 6

static const char TRUNCATED[] = "truncated";
static const char COUNT[] = "count larger than the frame";
static const char CLOCK_RANGE[] = "clock out of range";
static const char EMPTY[] = "empty struct";
static const char TOO_DEEP[] = "nesting too deep";
static const char BAD_UTF8[] = "invalid UTF-8";

/* Set once by init(). */
static PyObject *invalid_update = NULL; /* collab.updates.InvalidUpdate */
static PyObject *check_json = NULL;     /* collab.updates._check_json(text, max_depth) */

typedef struct {
    uint64_t remaining;
    int in_object;
} AnyLevel;

typedef struct {
    const uint8_t *d;
    Py_ssize_t n;
    /* The InvalidUpdate message to raise; NULL with a Python exception set instead. */
    const char *err;
    long long max_depth;     /* max_depth clamped to [-1, LLONG_MAX]: same comparisons */
    PyObject *max_depth_obj; /* the caller's object, for _check_json */
    /* stack of the enclosing Any arrays/objects (_any_end) */
    AnyLevel *levels;
    Py_ssize_t levels_cap;
    AnyLevel levels_local[64];
    /* client ids of the struct section (open addressing; EMPTY_SLOT marks a free slot) */
    uint64_t *seen;
    size_t seen_mask;
    size_t seen_count;
    uint64_t seen_local[64];
} Scan;

#define EMPTY_SLOT UINT64_MAX /* client ids are <= 2**53 - 1 */

#define FAIL(msg)          \
    do {                   \
        s->err = (msg);    \
        return -1;         \
    } while (0)

/* ------------------------------------------------------------------------------------------
 * lib0 primitives. `*pos` may be past the end only inside any_end (fixed-size skips); every
 * read checks `p >= n` first, as data[pos] raises IndexError in Python. */

/* _varuint_tail: `first` (>= 0x80) was read, *pos is just after it. */
static int
varuint_tail(Scan *s, Py_ssize_t *pos, unsigned first, uint64_t *out)
{
    const uint8_t *d = s->d;
    const Py_ssize_t n = s->n;
    Py_ssize_t p = *pos;
    uint64_t num = first & 0x7F;
    for (int shift = 7; shift <= 49; shift += 7) {
        if (p >= n)
            FAIL(TRUNCATED);
        unsigned b = d[p++];
        if (b < 0x80) {
            num |= (uint64_t)b << shift;
            if (shift == 49 && num > MAX_SAFE_INTEGER)
                FAIL("integer out of range");
            *out = num;
            *pos = p;
            return 0;
        }
        if (shift == 49)
            FAIL("varint longer than 8 bytes");
        num |= (uint64_t)(b & 0x7F) << shift;
    }
    FAIL("varint longer than 8 bytes"); /* not reached */
}

/* Read one varUint into the uint64_t lvalue `v`; on error, `goto fail`. Needs s, d, n, p. */
#define READ_VARUINT(v)                                                 \
    do {                                                                \
        if (p >= n) {                                                   \
            s->err = TRUNCATED;                                         \
            goto fail;                                                  \
        }                                                               \
        (v) = d[p++];                                                   \
        if ((v) >= 0x80 && varuint_tail(s, &p, (unsigned)(v), &(v)) < 0) \
            goto fail;                                                  \
    } while (0)

#define READ_BYTE(v)                \
    do {                            \
        if (p >= n) {               \
            s->err = TRUNCATED;     \
            goto fail;              \
        }                           \
        (v) = d[p++];               \
    } while (0)

static inline int
read_varuint(Scan *s, Py_ssize_t *pos, uint64_t *out)
{
    if (*pos >= s->n)
        FAIL(TRUNCATED);
    unsigned b = s->d[(*pos)++];
    if (b < 0x80) {
        *out = b;
        return 0;
    }
    return varuint_tail(s, pos, b, out);
}

/* _skip_varint: a lib0 signed varInt (6 value bits + sign in the first byte). */
static int
skip_varint(Scan *s, Py_ssize_t *pos)
{
    const uint8_t *d = s->d;
    const Py_ssize_t n = s->n;
    Py_ssize_t p = *pos;
    if (p >= n)
        FAIL(TRUNCATED);
    unsigned b = d[p++];
    if (b < 0x80) {
        *pos = p;
        return 0;
    }
    uint64_t num = b & 0x3F;
    int shift = 6;
    for (int i = 0; i < 7; i++) {
        if (p >= n)
            FAIL(TRUNCATED);
        b = d[p++];
        num |= (uint64_t)(b & 0x7F) << shift; /* shift <= 48: at most 55 bits */
        if (b < 0x80) {
            if (num > MAX_SAFE_INTEGER)
                FAIL("integer out of range");
            *pos = p;
            return 0;
        }
        shift += 7;
    }
    FAIL("varint longer than 8 bytes");
}

/* Strict UTF-8, exactly what bytes.decode("utf-8") accepts (no surrogates, no overlong
 * forms, nothing above U+10FFFF). Returns 1 if valid and sets *units to the length in UTF-16
 * code units (code points + one more per 4-byte sequence); 0 if invalid. */
static int
utf8_units(const uint8_t *p, Py_ssize_t len, Py_ssize_t *units)
{
    Py_ssize_t i = 0, u = 0;
    while (i < len) {
        if (len - i >= 8) {
            uint64_t w;
            memcpy(&w, p + i, 8);
            if (!(w & UINT64_C(0x8080808080808080))) {
                i += 8;
                u += 8;
                continue;
            }
        }
        unsigned c = p[i];
        if (c < 0x80) {
            i++;
            u++;
            continue;
        }
        if (c < 0xC2)
            return 0; /* continuation byte, or overlong 2-byte lead */
        if (c < 0xE0) {
            if (len - i < 2 || (p[i + 1] & 0xC0) != 0x80)
                return 0;
            i += 2;
            u++;
            continue;
        }
        if (c < 0xF0) {
            if (len - i < 3)
                return 0;
            unsigned c1 = p[i + 1];
            if (c == 0xE0 ? (c1 < 0xA0 || c1 > 0xBF)      /* overlong */
                : c == 0xED ? (c1 < 0x80 || c1 > 0x9F)    /* surrogates */
                : (c1 & 0xC0) != 0x80)
                return 0;
            if ((p[i + 2] & 0xC0) != 0x80)
                return 0;
            i += 3;
            u++;
            continue;
        }
        if (c < 0xF5) {
            if (len - i < 4)
                return 0;
            unsigned c1 = p[i + 1];
            if (c == 0xF0 ? (c1 < 0x90 || c1 > 0xBF)      /* overlong */
                : c == 0xF4 ? (c1 < 0x80 || c1 > 0x8F)    /* above U+10FFFF */
                : (c1 & 0xC0) != 0x80)
                return 0;
            if ((p[i + 2] & 0xC0) != 0x80 || (p[i + 3] & 0xC0) != 0x80)
                return 0;
            i += 4;
            u += 2;
            continue;
        }
        return 0;
    }
    *units = u;
    return 1;
}

/* The varUint length of a varString / varUint8Array at *pos; sets *pos to the first byte of
 * the payload and *end after it (checked against the buffer, as in Python). */
static inline int
sized_end(Scan *s, Py_ssize_t *pos, Py_ssize_t *end)
{
    uint64_t len;
    if (read_varuint(s, pos, &len) < 0)
        return -1;
    /* *pos <= n here and len < 2**53: no overflow */
    if ((uint64_t)*pos + len > (uint64_t)s->n)
        FAIL(TRUNCATED);
    *end = *pos + (Py_ssize_t)len;
    return 0;
}

/* _string_end */
static int
string_end(Scan *s, Py_ssize_t *pos)
{
    Py_ssize_t start, end, units;
    start = *pos;
    if (sized_end(s, &start, &end) < 0)
        return -1;
    if (end > start && !utf8_units(s->d + start, end - start, &units))
        FAIL(BAD_UTF8);
    *pos = end;
    return 0;
}

/* _buffer_end */
static int
buffer_end(Scan *s, Py_ssize_t *pos)
{
    Py_ssize_t start = *pos, end;
    if (sized_end(s, &start, &end) < 0)
        return -1;
    *pos = end;
    return 0;
}

/* _plausible; pos <= n */
static inline int
plausible(Scan *s, uint64_t count, Py_ssize_t pos, unsigned min_bytes)
{
    if (count * min_bytes > (uint64_t)(s->n - pos))
        FAIL(COUNT);
    return 0;
}

/* ------------------------------------------------------------------------------------------
 * JSON */

static inline const uint8_t *
json_ws(const uint8_t *p, const uint8_t *end)
{
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    return p;
}

static inline int
is_hex(unsigned c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

/* A JSON string literal whose opening quote is at *pp - 1; 1 and *pp after the closing quote,
 * or 0. The bytes are valid UTF-8 already; json.loads (strict) refuses only raw control
 * characters U+0000-U+001F and escapes other than \" \\ \/ \b \f \n \r \t \uXXXX. */
static int
json_string(const uint8_t **pp, const uint8_t *end)
{
    const uint8_t *p = *pp;
    while (p < end) {
        unsigned c = *p++;
        if (c == '"') {
            *pp = p;
            return 1;
        }
        if (c < 0x20)
            return 0;
        if (c == '\\') {
            if (p >= end)
                return 0;
            c = *p++;
            if (c == 'u') {
                if (end - p < 4 || !is_hex(p[0]) || !is_hex(p[1]) || !is_hex(p[2]) || !is_hex(p[3]))
                    return 0;
                p += 4;
            }
            else if (!(c == '"' || c == '\\' || c == '/' || c == 'b' || c == 'f' || c == 'n' ||
                       c == 'r' || c == 't'))
                return 0;
        }
    }
    return 0;
}

#define JSON_MAX_FAST_DEPTH 64
#define JSON_MAX_FAST_DIGITS 600 /* sys.set_int_max_str_digits() accepts no limit below 640 */

/* What _check_json(text, max_depth) does, when it is certain:
 * JSON_VALID: json.loads(text, parse_constant=<reject>) accepts the text and json_depth(text)
 *   is *depth_out: valid JSON (RFC 8259; whitespace " \t\n\r") nested at most
 *   JSON_MAX_FAST_DEPTH deep, whose integers have at most JSON_MAX_FAST_DIGITS digits. For valid
 *   JSON, json_depth (brackets outside string literals) is the nesting depth of the value.
 * JSON_TOO_DEEP: a valid JSON prefix of the text opens more than max_depth containers. Its
 *   brackets and string literals are the ones json_depth sees, with none unbalanced, so
 *   json_depth(text) > max_depth whatever follows: _check_json raises "nesting too deep".
 * JSON_UNSURE otherwise: the caller asks the Python _check_json. */
enum { JSON_UNSURE, JSON_VALID, JSON_TOO_DEEP };

static int
json_fast(const uint8_t *p, Py_ssize_t len, long long max_depth, int *depth_out)
{
    const uint8_t *end = p + len;
    uint64_t objects = 0; /* bit k set: the container at depth k + 1 is an object */
    int depth = 0, deepest = 0;

value:
    p = json_ws(p, end);
    if (p >= end)
        return JSON_UNSURE;
    switch (*p) {
    case '{':
    case '[': {
        int is_object = *p == '{';
        p++;
        if (depth + 1 > max_depth)
            return JSON_TOO_DEEP;
        if (depth == JSON_MAX_FAST_DEPTH)
            return JSON_UNSURE;
        if (is_object)
            objects |= UINT64_C(1) << depth;
        else
            objects &= ~(UINT64_C(1) << depth);
        depth++;
        if (depth > deepest)
            deepest = depth;
        p = json_ws(p, end);
        if (p >= end)
            return JSON_UNSURE;
        if (*p == (is_object ? '}' : ']')) {
            p++;
            depth--;
            goto after_value;
        }
        if (is_object)
            goto key;
        goto value;
    }
    case '"':
        p++;
        if (!json_string(&p, end))
            return JSON_UNSURE;
        goto after_value;
    case 't':
        if (end - p < 4 || memcmp(p, "true", 4))
            return JSON_UNSURE;
        p += 4;
        goto after_value;
    case 'f':
        if (end - p < 5 || memcmp(p, "false", 5))
            return JSON_UNSURE;
        p += 5;
        goto after_value;
    case 'n':
        if (end - p < 4 || memcmp(p, "null", 4))
            return JSON_UNSURE;
        p += 4;
        goto after_value;
    default: {
        /* -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)? */
        int is_integer = 1;
        Py_ssize_t digits = 0;
        if (*p == '-') {
            p++;
            if (p >= end)
                return JSON_UNSURE;
        }
        if (*p == '0') {
            p++;
        }
        else if (*p >= '1' && *p <= '9') {
            while (p < end && *p >= '0' && *p <= '9') {
                p++;
                digits++;
            }
        }
        else {
            return JSON_UNSURE;
        }
        if (p < end && *p == '.') {
            p++;
            if (p >= end || !(*p >= '0' && *p <= '9'))
                return JSON_UNSURE;
            while (p < end && *p >= '0' && *p <= '9')
                p++;
            is_integer = 0;
        }
        if (p < end && (*p == 'e' || *p == 'E')) {
            p++;
            if (p < end && (*p == '-' || *p == '+'))
                p++;
            if (p >= end || !(*p >= '0' && *p <= '9'))
                return JSON_UNSURE;
            while (p < end && *p >= '0' && *p <= '9')
                p++;
            is_integer = 0;
        }
        if (is_integer && digits > JSON_MAX_FAST_DIGITS)
            return JSON_UNSURE; /* int() may refuse it (sys.get_int_max_str_digits) */
        goto after_value;
    }
    }

key:
    if (*p != '"')
        return JSON_UNSURE;
    p++;
    if (!json_string(&p, end))
        return JSON_UNSURE;
    p = json_ws(p, end);
    if (p >= end || *p != ':')
        return JSON_UNSURE;
    p++;
    goto value;

after_value:
    p = json_ws(p, end);
    if (!depth) {
        if (p != end)
            return JSON_UNSURE;
        *depth_out = deepest;
        return JSON_VALID;
    }
    if (p >= end)
        return JSON_UNSURE;
    {
        int is_object = (int)((objects >> (depth - 1)) & 1);
        if (*p == ',') {
            p = json_ws(p + 1, end);
            if (p >= end)
                return JSON_UNSURE;
            if (is_object)
                goto key;
            goto value;
        }
        if (*p == (is_object ? '}' : ']')) {
            p++;
            depth--;
            goto after_value;
        }
    }
    return JSON_UNSURE;
}

/* _check_json on the valid UTF-8 text d[start:end] */
static int
json_check(Scan *s, Py_ssize_t start, Py_ssize_t end)
{
    int depth;
    switch (json_fast(s->d + start, end - start, s->max_depth, &depth)) {
    case JSON_VALID:
        if (depth > s->max_depth) /* max_depth -1: even "1" is too deep */
            FAIL(TOO_DEEP);
        return 0;
    case JSON_TOO_DEEP:
        FAIL(TOO_DEEP);
    default:
        break;
    }
    PyObject *text = PyUnicode_DecodeUTF8((const char *)s->d + start, end - start, "strict");
    if (text == NULL) {
        s->err = NULL;
        return -1;
    }
    PyObject *result = PyObject_CallFunctionObjArgs(check_json, text, s->max_depth_obj, NULL);
    Py_DECREF(text);
    if (result == NULL) {
        s->err = NULL;
        return -1;
    }
    Py_DECREF(result);
    return 0;
}

/* _read_string, then (unless `undefined_ok` and the text is "undefined") _check_json. */
static int
json_string_content(Scan *s, Py_ssize_t *pos, int undefined_ok)
{
    Py_ssize_t start = *pos, end, units;
    if (sized_end(s, &start, &end) < 0)
        return -1;
    if (!utf8_units(s->d + start, end - start, &units))
        FAIL(BAD_UTF8);
    *pos = end;
    if (undefined_ok && end - start == 9 && !memcmp(s->d + start, "undefined", 9))
        return 0;
    return json_check(s, start, end);
}

/* ------------------------------------------------------------------------------------------
 * lib0 Any */

static int
push_level(Scan *s, Py_ssize_t depth, uint64_t remaining, int in_object)
{
    if (depth == s->levels_cap) {
        Py_ssize_t cap = s->levels_cap * 2;
        AnyLevel *levels;
        if (s->levels == s->levels_local) {
            levels = PyMem_Malloc((size_t)cap * sizeof(AnyLevel));
            if (levels != NULL)
                memcpy(levels, s->levels_local, sizeof(s->levels_local));
        }
        else {
            levels = PyMem_Realloc(s->levels, (size_t)cap * sizeof(AnyLevel));
        }
        if (levels == NULL) {
            PyErr_NoMemory();
            s->err = NULL;
            return -1;
        }
        s->levels = levels;
        s->levels_cap = cap;
    }
    s->levels[depth].remaining = remaining;
    s->levels[depth].in_object = in_object;
    return 0;
}

/* _any_end: skip `count` consecutive Any values at *pos. */
static int
any_end(Scan *s, Py_ssize_t *pos, uint64_t count)
{
    const uint8_t *d = s->d;
    const Py_ssize_t n = s->n;
    Py_ssize_t p = *pos;
    Py_ssize_t depth = 0; /* len(stack) */
    uint64_t remaining = count;
    int in_object = 0;
    for (;;) {
        if (!remaining) {
            if (!depth)
                break;
            depth--;
            remaining = s->levels[depth].remaining;
            in_object = s->levels[depth].in_object;
            continue;
        }
        remaining--;
        if (in_object && string_end(s, &p) < 0)
            return -1;
        unsigned tag;
        READ_BYTE(tag);
        switch (tag) {
        case 119: /* string */
            if (string_end(s, &p) < 0)
                return -1;
            break;
        case 124: /* float32 */
            p += 4;
            break;
        case 123: /* float64 */
        case 122: /* bigint64 */
            p += 8;
            break;
        case 125: /* varInt */
            if (skip_varint(s, &p) < 0)
                return -1;
            break;
        case 120: /* true */
        case 121: /* false */
        case 126: /* null */
        case 127: /* undefined */
            break;
        case 118: /* object */
        case 117: /* array */ {
            uint64_t size;
            if ((long long)depth >= s->max_depth)
                FAIL(TOO_DEEP);
            READ_VARUINT(size);
            if (size) {
                /* an object entry needs >= 2 bytes (key length + tag), an array element >= 1 */
                if (plausible(s, size, p, tag == 118 ? 2 : 1) < 0)
                    return -1;
                if (push_level(s, depth, remaining, in_object) < 0)
                    return -1;
                depth++;
                remaining = size;
                in_object = tag == 118;
            }
            break;
        }
        case 116: /* Uint8Array */
            if (buffer_end(s, &p) < 0)
                return -1;
            break;
        default:
            FAIL("unknown Any type tag");
        }
    }
    if (p > n)
        FAIL(TRUNCATED);
    *pos = p;
    return 0;
fail:
    return -1;
}

/* ------------------------------------------------------------------------------------------
 * Updates */

/* Add `client` to the set of client ids seen; 1 if it was there already, -1 on error. */
static int
seen_add(Scan *s, uint64_t client)
{
    if ((s->seen_count + 1) * 2 > s->seen_mask + 1) {
        size_t old_size = s->seen_mask + 1, size = old_size * 2;
        uint64_t *old = s->seen, *slots;
        if (size > PY_SSIZE_T_MAX / sizeof(uint64_t) || !(slots = PyMem_Malloc(size * sizeof(uint64_t)))) {
            PyErr_NoMemory();
            s->err = NULL;
            return -1;
        }
        memset(slots, 0xFF, size * sizeof(uint64_t));
        s->seen = slots;
        s->seen_mask = size - 1;
        for (size_t i = 0; i < old_size; i++) {
            if (old[i] != EMPTY_SLOT) {
                size_t h = (size_t)((old[i] * UINT64_C(0x9E3779B97F4A7C15)) >> 20) & s->seen_mask;
                while (slots[h] != EMPTY_SLOT)
                    h = (h + 1) & s->seen_mask;
                slots[h] = old[i];
            }
        }
        if (old != s->seen_local)
            PyMem_Free(old);
    }
    size_t h = (size_t)((client * UINT64_C(0x9E3779B97F4A7C15)) >> 20) & s->seen_mask;
    while (s->seen[h] != EMPTY_SLOT) {
        if (s->seen[h] == client)
            return 1;
        h = (h + 1) & s->seen_mask;
    }
    s->seen[h] = client;
    s->seen_count++;
    return 0;
}

/* _check_reference: an item refers to (ref_client, ref_clock), a clock not below its own. */
static inline int
check_reference(Scan *s, uint64_t ref_client, uint64_t ref_clock, uint64_t client)
{
    if (ref_client == client)
        FAIL("item refers to a later clock of its own client");
    if (ref_clock > MAX_CLOCK)
        FAIL(CLOCK_RANGE);
    return 0;
}

/* _scan_update(data, max_depth, None): 0 valid, 1 need the graph, -1 error. */
static int
scan_update(Scan *s)
{
    const uint8_t *d = s->d;
    const Py_ssize_t n = s->n;
    Py_ssize_t p = 0;
    uint64_t num_clients, types = 0;

    READ_VARUINT(num_clients);
    if (num_clients * 3 > (uint64_t)(n - p))
        FAIL(COUNT);
    if (num_clients > 1)
        memset(s->seen_local, 0xFF, sizeof(s->seen_local));
    for (uint64_t c = 0; c < num_clients; c++) {
        uint64_t num_structs, client, clock;
        READ_VARUINT(num_structs);
        READ_VARUINT(client);
        READ_BYTE(clock);
        if (clock >= 0x80) {
            if (varuint_tail(s, &p, (unsigned)clock, &clock) < 0)
                goto fail;
            if (clock > MAX_CLOCK)
                FAIL(CLOCK_RANGE);
        }
        if (num_structs * 2 > (uint64_t)(n - p)) /* info byte + at least one more byte each */
            FAIL(COUNT);
        if (!num_structs)
            FAIL("empty client section");
        if (num_clients > 1) {
            int dup = seen_add(s, client);
            if (dup < 0)
                goto fail;
            if (dup)
                FAIL("client listed twice");
        }
        for (uint64_t k = 0; k < num_structs; k++) {
            unsigned info;
            uint64_t length;
            READ_BYTE(info);
            unsigned ref = info & 0x1F;
            if (ref == 0 || ref == 10) { /* GC, Skip */
                READ_VARUINT(length);
                if (!length)
                    FAIL(EMPTY);
                clock += length; /* < 2**32 + 2**53 */
                if (clock > MAX_CLOCK)
                    FAIL(CLOCK_RANGE);
                continue;
            }

            /* ---- Item: origin, right origin, parent */
            if (info & 0x80) {
                uint64_t oc, ok;
                READ_VARUINT(oc);
                READ_VARUINT(ok);
                if (ok >= clock && check_reference(s, oc, ok, client) < 0)
                    goto fail;
            }
            if (info & 0x40) {
                uint64_t rc, rk;
                READ_VARUINT(rc);
                READ_VARUINT(rk);
                if (rk >= clock && check_reference(s, rc, rk, client) < 0)
                    goto fail;
            }
            if (!(info & 0xC0)) {
                uint64_t parent_info;
                READ_VARUINT(parent_info);
                if (parent_info == 1) { /* a root type, by name */
                    if (string_end(s, &p) < 0)
                        goto fail;
                }
                else { /* the id of a ContentType item */
                    uint64_t pc, pk;
                    READ_VARUINT(pc);
                    READ_VARUINT(pk);
                    if (pk >= clock && check_reference(s, pc, pk, client) < 0)
                        goto fail;
                }
                if ((info & 0x20) && string_end(s, &p) < 0) /* parentSub */
                    goto fail;
            }

            /* ---- content; `length` is the number of clock ticks the item covers */
            switch (ref) {
            case 4: { /* String; its length counts UTF-16 code units */
                uint64_t size;
                Py_ssize_t units;
                READ_VARUINT(size);
                if ((uint64_t)p + size > (uint64_t)n)
                    FAIL(TRUNCATED);
                if (!utf8_units(d + p, (Py_ssize_t)size, &units))
                    FAIL(BAD_UTF8);
                length = (uint64_t)units;
                p += (Py_ssize_t)size;
                break;
            }
            case 8: /* Any */
                READ_VARUINT(length);
                if (length > (uint64_t)(n - p))
                    FAIL(COUNT);
                if (any_end(s, &p, length) < 0)
                    goto fail;
                break;
            case 1: /* Deleted */
                READ_VARUINT(length);
                break;
            case 6: /* Format: key, JSON value */
                if (string_end(s, &p) < 0 || json_string_content(s, &p, 0) < 0)
                    goto fail;
                length = 1;
                break;
            case 7: { /* Type */
                uint64_t type_ref;
                READ_VARUINT(type_ref);
                if (type_ref > MAX_TYPE_REF)
                    FAIL("unknown type ref");
                if ((type_ref == 3 || type_ref == 5) && string_end(s, &p) < 0)
                    goto fail;
                types++;
                if ((long long)types > s->max_depth)
                    return 1; /* _NeedGraph */
                length = 1;
                break;
            }
            case 5: /* Embed: JSON */
                if (json_string_content(s, &p, 0) < 0)
                    goto fail;
                length = 1;
                break;
            case 3: /* Binary */
                if (buffer_end(s, &p) < 0)
                    goto fail;
                length = 1;
                break;
            case 2: /* JSON (legacy): `length` JSON texts, or "undefined" */
                READ_VARUINT(length);
                if (length > (uint64_t)(n - p))
                    FAIL(COUNT);
                for (uint64_t i = 0; i < length; i++) {
                    if (json_string_content(s, &p, 1) < 0)
                        goto fail;
                }
                break;
            case 9: /* Doc: guid, options */
                if (string_end(s, &p) < 0 || any_end(s, &p, 1) < 0)
                    goto fail;
                length = 1;
                break;
            default:
                FAIL("unknown content ref");
            }
            if (!length)
                FAIL(EMPTY);
            clock += length;
            if (clock > MAX_CLOCK)
                FAIL(CLOCK_RANGE);
        }
    }

    /* ---- delete set: per client, ranges of (clock, length) */
    READ_VARUINT(num_clients);
    if (num_clients * 2 > (uint64_t)(n - p))
        FAIL(COUNT);
    for (uint64_t c = 0; c < num_clients; c++) {
        uint64_t client, num_ranges;
        READ_VARUINT(client);
        READ_VARUINT(num_ranges);
        if (num_ranges * 2 > (uint64_t)(n - p))
            FAIL(COUNT);
        for (uint64_t r = 0; r < num_ranges; r++) {
            uint64_t clock, length;
            READ_VARUINT(clock);
            READ_VARUINT(length);
            if (clock + length > MAX_CLOCK)
                FAIL(CLOCK_RANGE);
            if (!length)
                FAIL("empty delete range");
        }
    }

    if (p != n)
        FAIL("trailing bytes after the update");
    return 0;
fail:
    return -1;
}

/* ------------------------------------------------------------------------------------------
 * Module */

PyDoc_STRVAR(scan_doc,
"scan(data: bytes, max_depth: int) -> bool\n\n"
"Check one Yjs v1 update as collab.updates._scan_update(data, max_depth, None) does.\n"
"False: valid. True: more type items than max_depth (check nesting with the Python graph\n"
"scan). Raises InvalidUpdate (\"truncated\" for a read past the end) otherwise.");

static PyObject *
fastscan_scan(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "scan() takes exactly 2 arguments (data, max_depth)");
        return NULL;
    }
    if (invalid_update == NULL || check_json == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "collab._fastscan.init() was not called");
        return NULL;
    }
    PyObject *data = args[0], *max_depth = args[1];
    if (!PyBytes_Check(data)) {
        PyErr_Format(PyExc_TypeError, "data must be bytes, not %.100s", Py_TYPE(data)->tp_name);
        return NULL;
    }
    if (!PyLong_Check(max_depth)) {
        PyErr_Format(PyExc_TypeError, "max_depth must be int, not %.100s",
                     Py_TYPE(max_depth)->tp_name);
        return NULL;
    }
    int overflow;
    long long md = PyLong_AsLongLongAndOverflow(max_depth, &overflow);
    if (md == -1 && PyErr_Occurred())
        return NULL;
    /* every comparison with max_depth is `x > max_depth` or `x >= max_depth` with x >= 0 */
    if (overflow > 0)
        md = LLONG_MAX;
    else if (overflow < 0 || md < -1)
        md = -1;

    Scan s;
    s.d = (const uint8_t *)PyBytes_AS_STRING(data);
    s.n = PyBytes_GET_SIZE(data);
    s.err = NULL;
    s.max_depth = md;
    s.max_depth_obj = max_depth;
    s.levels = s.levels_local;
    s.levels_cap = (Py_ssize_t)(sizeof(s.levels_local) / sizeof(s.levels_local[0]));
    s.seen = s.seen_local;
    s.seen_mask = sizeof(s.seen_local) / sizeof(s.seen_local[0]) - 1;
    s.seen_count = 0; /* seen_local is cleared by scan_update when it needs the set */

    Py_INCREF(data); /* the buffer must outlive any callback into Python */
    int result = scan_update(&s);
    Py_DECREF(data);
    if (s.levels != s.levels_local)
        PyMem_Free(s.levels);
    if (s.seen != s.seen_local)
        PyMem_Free(s.seen);
    if (result < 0) {
        if (s.err != NULL)
            PyErr_SetString(invalid_update, s.err);
        return NULL;
    }
    return PyBool_FromLong(result);
}

PyDoc_STRVAR(init_doc,
"init(invalid_update, check_json)\n\n"
"Give the module collab.updates' InvalidUpdate class and its _check_json(text, max_depth),\n"
"which scan() calls for JSON texts it does not settle itself.");

static PyObject *
fastscan_init(PyObject *Py_UNUSED(module), PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"invalid_update", "check_json", NULL};
    PyObject *exc, *func;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO:init", kwlist, &exc, &func))
        return NULL;
    if (!PyExceptionClass_Check(exc)) {
        PyErr_SetString(PyExc_TypeError, "invalid_update must be an exception class");
        return NULL;
    }
    if (!PyCallable_Check(func)) {
        PyErr_SetString(PyExc_TypeError, "check_json must be callable");
        return NULL;
    }
    Py_INCREF(exc);
    Py_XSETREF(invalid_update, exc);
    Py_INCREF(func);
    Py_XSETREF(check_json, func);
    Py_RETURN_NONE;
}

static PyMethodDef fastscan_methods[] = {
    {"scan", (PyCFunction)(void (*)(void))fastscan_scan, METH_FASTCALL, scan_doc},
    {"init", (PyCFunction)(void (*)(void))fastscan_init, METH_VARARGS | METH_KEYWORDS, init_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fastscan_module = {
    PyModuleDef_HEAD_INIT,
    "collab._fastscan",
    "C version of the no-graph scan of collab.updates (see collab/updates.py).",
    -1,
    fastscan_methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC
PyInit__fastscan(void)
{
    return PyModule_Create(&fastscan_module);
}
