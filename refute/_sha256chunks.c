/* The leaves of many states in one call, for refute.leaves (layout: docs/FORMATS.md "Leaves").
 *
 * leaves(states, threads) -> bytes: `states` is a sequence of states, each a sequence of
 * buffers whose concatenation is the state's canonical bytes (tensor headers and values). For
 * each state, in order, 32 bytes:
 *
 *     chunk c        h_c  = sha256(0x00 || bytes[4096 c : 4096 (c + 1)])   (last one shorter)
 *     tree           node = sha256(0x01 || left || right), an odd last node carried up
 *     leaf                  sha256(0x02 || uint64 LE byte length || root)
 *
 * The hashing is OpenSSL's (libcrypto, the library Python's hashlib uses). This file walks the
 * chunks without copying them (a chunk that straddles two buffers is gathered into a 4 KiB
 * scratch buffer), spreads the chunks of all states over `threads` POSIX threads with the GIL
 * released, and builds each tree in place on the thread that hashed the state's last chunk, so
 * that committing a trace costs the hash and nothing of the interpreter.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#define CHUNK 4096
#define DIGEST 32
#define MAX_THREADS 256

typedef struct {
    const unsigned char *data;
    Py_ssize_t len;
} piece_t;

typedef struct {
    Py_ssize_t first_piece; /* index into the flat piece array */
    Py_ssize_t pieces;
    Py_ssize_t length;      /* canonical byte length */
    Py_ssize_t first_chunk; /* index into the flat chunk-hash array */
    Py_ssize_t chunks;
    atomic_long remaining;  /* chunks not hashed yet: whoever hashes the last builds the tree */
} state_t;

typedef struct {
    const piece_t *pieces;
    state_t *states;
    Py_ssize_t nstates;
    unsigned char *hashes; /* DIGEST bytes per chunk, all states */
    unsigned char *leaves; /* DIGEST bytes per state */
    Py_ssize_t begin, end; /* this worker's flat chunk range */
    int ok;
} work_t;

/* SHA-256, fetched once: an implicit fetch on every init (EVP_sha256()) costs a sixth of hashing
 * a 4 KiB chunk. */
static EVP_MD *sha256_md = NULL;

/* sha256(prefix || a || b) into out; a or b may be empty. */
static int digest3(EVP_MD_CTX *ctx, unsigned char prefix, const void *a, size_t alen,
                   const void *b, size_t blen, unsigned char *out) {
    unsigned int length = 0;
    return EVP_DigestInit_ex2(ctx, sha256_md, NULL) == 1 &&
           EVP_DigestUpdate(ctx, &prefix, 1) == 1 &&
           (alen == 0 || EVP_DigestUpdate(ctx, a, alen) == 1) &&
           (blen == 0 || EVP_DigestUpdate(ctx, b, blen) == 1) &&
           EVP_DigestFinal_ex(ctx, out, &length) == 1 && length == DIGEST;
}

/* Hash chunk `c` (0-based within state `s`) into out, gathering it if it straddles pieces. */
static int hash_chunk(EVP_MD_CTX *ctx, const work_t *w, const state_t *s, Py_ssize_t c,
                      unsigned char *scratch, unsigned char *out) {
    Py_ssize_t start = c * CHUNK;
    Py_ssize_t size = s->length - start < CHUNK ? s->length - start : CHUNK;
    /* Find the piece holding byte `start` (states hold few pieces: a linear walk). */
    Py_ssize_t p = s->first_piece, offset = start;
    while (offset >= w->pieces[p].len) {
        offset -= w->pieces[p].len;
        p++;
    }
    if (offset + size <= w->pieces[p].len) {
        return digest3(ctx, 0x00, w->pieces[p].data + offset, (size_t)size, NULL, 0, out);
    }
    Py_ssize_t filled = 0;
    while (filled < size) {
        Py_ssize_t take = w->pieces[p].len - offset;
        if (take > size - filled) {
            take = size - filled;
        }
        memcpy(scratch + filled, w->pieces[p].data + offset, (size_t)take);
        filled += take;
        offset = 0;
        p++;
    }
    return digest3(ctx, 0x00, scratch, (size_t)size, NULL, 0, out);
}

/* Reduce `count` chunk hashes in place to the root, then write the leaf to out. */
static int finish_leaf(EVP_MD_CTX *ctx, unsigned char *nodes, Py_ssize_t count,
                       Py_ssize_t length, unsigned char *out) {
    while (count > 1) {
        Py_ssize_t up = 0;
        for (Py_ssize_t i = 0; i + 1 < count; i += 2, up++) {
            unsigned char pair[2 * DIGEST];
            memcpy(pair, nodes + DIGEST * i, 2 * DIGEST);
            if (!digest3(ctx, 0x01, pair, 2 * DIGEST, NULL, 0, nodes + DIGEST * up)) {
                return 0;
            }
        }
        if (count % 2) {
            memmove(nodes + DIGEST * up, nodes + DIGEST * (count - 1), DIGEST);
            up++;
        }
        count = up;
    }
    unsigned char le[8];
    uint64_t n = (uint64_t)length;
    for (int i = 0; i < 8; i++) {
        le[i] = (unsigned char)(n >> (8 * i));
    }
    return digest3(ctx, 0x02, le, 8, nodes, DIGEST, out);
}

/* A worker: hash the chunks of its flat range, state by state; the worker that hashes the last
 * chunk of a state (whichever it is) reduces that state's tree, so trees are built in parallel
 * too. */
static void *hash_range(void *arg) {
    work_t *w = (work_t *)arg;
    unsigned char scratch[CHUNK];
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    w->ok = ctx != NULL;
    Py_ssize_t s = 0;
    for (Py_ssize_t g = w->begin; w->ok && g < w->end;) {
        state_t *state = &w->states[s];
        Py_ssize_t stop = state->first_chunk + state->chunks;
        if (g >= stop) {
            s++;
            continue;
        }
        Py_ssize_t last = stop < w->end ? stop : w->end;
        for (Py_ssize_t h = g; w->ok && h < last; h++) {
            w->ok = hash_chunk(ctx, w, state, h - state->first_chunk, scratch,
                               w->hashes + DIGEST * h);
        }
        if (w->ok && atomic_fetch_sub(&state->remaining, (long)(last - g)) == (long)(last - g)) {
            w->ok = finish_leaf(ctx, w->hashes + DIGEST * state->first_chunk, state->chunks,
                                state->length, w->leaves + DIGEST * s);
        }
        g = last;
    }
    EVP_MD_CTX_free(ctx);
    return NULL;
}

/* Hash every chunk and build every tree over `threads` threads; 1 on success. */
static int compute(const piece_t *pieces, state_t *states, Py_ssize_t nstates,
                   Py_ssize_t total, int threads, unsigned char *hashes, unsigned char *out) {
    work_t work[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    if (threads > total) {
        threads = total > 0 ? (int)total : 1;
    }
    for (int t = 0; t < threads; t++) {
        work[t] = (work_t){pieces, states, nstates, hashes, out, total * t / threads,
                           total * (t + 1) / threads, 0};
    }
    for (int t = 1; t < threads; t++) {
        started[t] = pthread_create(&ids[t], NULL, hash_range, &work[t]) == 0;
        if (!started[t]) {
            hash_range(&work[t]); /* no thread to be had: do its share here */
        }
    }
    hash_range(&work[0]);
    int ok = 1;
    for (int t = 0; t < threads; t++) {
        if (t > 0 && started[t]) {
            pthread_join(ids[t], NULL);
        }
        ok = ok && work[t].ok;
    }
    return ok;
}

static PyObject *leaves(PyObject *self, PyObject *args) {
    PyObject *arg;
    int threads;
    (void)self;
    if (!PyArg_ParseTuple(args, "Oi", &arg, &threads)) {
        return NULL;
    }
    if (threads < 1 || threads > MAX_THREADS) {
        PyErr_Format(PyExc_ValueError, "threads must be in 1..%d", MAX_THREADS);
        return NULL;
    }
    PyObject *seq = PySequence_Fast(arg, "states must be a sequence of sequences of buffers");
    if (seq == NULL) {
        return NULL;
    }
    Py_ssize_t nstates = PySequence_Fast_GET_SIZE(seq);
    PyObject **inner = PyMem_Calloc((size_t)nstates + 1, sizeof(PyObject *));
    state_t *states = PyMem_Calloc((size_t)nstates + 1, sizeof(state_t));
    Py_buffer *views = NULL;
    piece_t *pieces = NULL;
    unsigned char *hashes = NULL;
    PyObject *out = NULL;
    Py_ssize_t npieces = 0, held = 0, total = 0;
    int ok = inner != NULL && states != NULL;
    for (Py_ssize_t s = 0; ok && s < nstates; s++) {
        inner[s] = PySequence_Fast(PySequence_Fast_GET_ITEM(seq, s),
                                   "a state must be a sequence of buffers");
        ok = inner[s] != NULL;
        if (ok) {
            npieces += PySequence_Fast_GET_SIZE(inner[s]);
        }
    }
    if (ok) {
        views = PyMem_Calloc((size_t)npieces + 1, sizeof(Py_buffer));
        pieces = PyMem_Calloc((size_t)npieces + 1, sizeof(piece_t));
        ok = views != NULL && pieces != NULL;
    }
    for (Py_ssize_t s = 0; ok && s < nstates; s++) {
        Py_ssize_t count = PySequence_Fast_GET_SIZE(inner[s]);
        states[s].first_piece = held;
        states[s].pieces = count;
        for (Py_ssize_t i = 0; ok && i < count; i++) {
            ok = PyObject_GetBuffer(PySequence_Fast_GET_ITEM(inner[s], i), &views[held],
                                    PyBUF_C_CONTIGUOUS) == 0;
            if (ok) {
                pieces[held] = (piece_t){views[held].buf, views[held].len};
                states[s].length += views[held].len;
                held++;
            }
        }
        if (ok && states[s].length == 0) {
            PyErr_SetString(PyExc_ValueError, "a state's canonical bytes cannot be empty");
            ok = 0;
        }
        if (ok) {
            states[s].first_chunk = total;
            states[s].chunks = (states[s].length + CHUNK - 1) / CHUNK;
            atomic_init(&states[s].remaining, (long)states[s].chunks);
            total += states[s].chunks;
        }
    }
    if (ok) {
        hashes = PyMem_RawMalloc((size_t)total * DIGEST + 1);
        out = PyBytes_FromStringAndSize(NULL, nstates * DIGEST);
        ok = hashes != NULL && out != NULL;
        if (hashes == NULL) {
            PyErr_NoMemory();
        }
    }
    if (ok) {
        unsigned char *dst = (unsigned char *)PyBytes_AS_STRING(out);
        Py_BEGIN_ALLOW_THREADS
        ok = compute(pieces, states, nstates, total, threads, hashes, dst);
        Py_END_ALLOW_THREADS
        if (!ok) {
            PyErr_SetString(PyExc_RuntimeError, "OpenSSL SHA-256 failed");
        }
    }
    for (Py_ssize_t i = 0; i < held; i++) {
        PyBuffer_Release(&views[i]);
    }
    for (Py_ssize_t s = 0; inner != NULL && s < nstates; s++) {
        Py_XDECREF(inner[s]);
    }
    PyMem_RawFree(hashes);
    PyMem_Free(pieces);
    PyMem_Free(views);
    PyMem_Free(states);
    PyMem_Free(inner);
    Py_DECREF(seq);
    if (!ok) {
        Py_XDECREF(out);
        if (!PyErr_Occurred()) {
            PyErr_NoMemory();
        }
        return NULL;
    }
    return out;
}

static PyMethodDef methods[] = {
    {"leaves", leaves, METH_VARARGS,
     "leaves(states, threads) -> the 32-byte leaf of every state (a sequence of buffers whose "
     "concatenation is its canonical bytes), concatenated."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_sha256chunks", NULL, -1, methods};

PyMODINIT_FUNC PyInit__sha256chunks(void) {
    sha256_md = EVP_MD_fetch(NULL, "SHA256", NULL);
    if (sha256_md == NULL) {
        PyErr_SetString(PyExc_ImportError, "OpenSSL has no SHA256");
        return NULL;
    }
    return PyModule_Create(&module);
}
