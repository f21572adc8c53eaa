/* SHA-256 of many equal-size chunks in one call, for refute.leaves.
 *
 * digests(data, prefix, chunk) -> bytes: for each consecutive `chunk`-byte piece c_i of
 * `data` (whose length must be a multiple of `chunk`), sha256(prefix || c_i), concatenated
 * (32 bytes each). The hashing is OpenSSL's (libcrypto, the library Python's hashlib uses); this
 * file only loops, with the GIL released, so that the per-chunk cost is the hash and not the
 * interpreter, and so that several Python threads hash in parallel.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <openssl/evp.h>

static PyObject *digests(PyObject *self, PyObject *args) {
    Py_buffer view;
    unsigned char prefix;
    Py_ssize_t chunk;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*bn", &view, &prefix, &chunk)) {
        return NULL;
    }
    if (chunk <= 0 || view.len % chunk != 0) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "data length must be a positive multiple of chunk");
        return NULL;
    }
    Py_ssize_t count = view.len / chunk;
    PyObject *out = PyBytes_FromStringAndSize(NULL, count * 32);
    if (out == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    unsigned char *dst = (unsigned char *)PyBytes_AS_STRING(out);
    const unsigned char *src = (const unsigned char *)view.buf;
    int ok = 1;
    Py_BEGIN_ALLOW_THREADS
    EVP_MD_CTX *base = EVP_MD_CTX_new();
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    ok = base != NULL && ctx != NULL && EVP_DigestInit_ex(base, EVP_sha256(), NULL) == 1 &&
         EVP_DigestUpdate(base, &prefix, 1) == 1;
    for (Py_ssize_t i = 0; ok && i < count; i++) {
        unsigned int length = 0;
        ok = EVP_MD_CTX_copy_ex(ctx, base) == 1 &&
             EVP_DigestUpdate(ctx, src + i * chunk, (size_t)chunk) == 1 &&
             EVP_DigestFinal_ex(ctx, dst + 32 * i, &length) == 1 && length == 32;
    }
    EVP_MD_CTX_free(ctx);
    EVP_MD_CTX_free(base);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    if (!ok) {
        Py_DECREF(out);
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL SHA-256 failed");
        return NULL;
    }
    return out;
}

static PyMethodDef methods[] = {
    {"digests", digests, METH_VARARGS,
     "digests(data, prefix, chunk) -> sha256(prefix || chunk_i) for every chunk, concatenated."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_sha256chunks", NULL, -1, methods};

PyMODINIT_FUNC PyInit__sha256chunks(void) { return PyModule_Create(&module); }
