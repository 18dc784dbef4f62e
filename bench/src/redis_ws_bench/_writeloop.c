/* The kernel floor's write loop: one frame to many sockets, in C.
 *
 * bench/floor.py stands for "the least a forwarder can do per delivery", so
 * its writes must not pay Python per recipient. This loop was the gateway's
 * until 2026-12-07 (redis_ws_gateway/fanout/_fanout.c): ten alternating
 * rounds of W1, W2 and W4 with and without it showed its gain smaller than
 * the run-to-run spread (docs/BENCHMARKS.md, "The C fan-out loop"), so the
 * gateway writes with its Python loop (fanout/writer.py) and the floor keeps
 * this one.
 *
 * Given the transports as well, it first asks each transport is_closing()
 * and skips the ones that are (a closing transport's descriptor may belong
 * to a newer connection). send(2) skips the VFS layer that write(2) goes
 * through; a descriptor that is not a socket gets write(2), so results match
 * os.write on any descriptor. MSG_NOSIGNAL: a dead peer is an EPIPE, never a
 * signal.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <sys/socket.h>
#include <unistd.h>

PyDoc_STRVAR(write_each_doc,
"write_each(frame, fds, transports=None, /)\n--\n\n"
"Write bytes `frame` to each descriptor in list `fds`. Returns None when\n"
"every write took the whole frame, else a list of (index, written) for the\n"
"others: written is the byte count of a partial write, 0 when the socket\n"
"was full (EAGAIN) or the call was interrupted, -1 on any other error.\n"
"With `transports` (a list as long as `fds`), a descriptor whose transport\n"
"is_closing() is not written and reported with -1.");

static PyObject *is_closing_name;

static PyObject *
write_each(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 2 || nargs > 3 || !PyBytes_CheckExact(args[0]) || !PyList_CheckExact(args[1])
        || (nargs == 3 && args[2] != Py_None
            && (!PyList_CheckExact(args[2])
                || PyList_GET_SIZE(args[2]) != PyList_GET_SIZE(args[1])))) {
        PyErr_SetString(PyExc_TypeError,
                        "write_each(frame: bytes, fds: list[int], "
                        "transports: list | None = None), as many transports as fds");
        return NULL;
    }
    const char *data = PyBytes_AS_STRING(args[0]);
    Py_ssize_t size = PyBytes_GET_SIZE(args[0]);
    PyObject *fds = args[1];
    PyObject *transports = nargs == 3 && args[2] != Py_None ? args[2] : NULL;
    PyObject *failed = NULL;

    /* The only Python code run here is is_closing(), a read of a transport's
     * state: the lists cannot change under the loop. Held all the same, as
     * their items are borrowed. */
    Py_INCREF(fds);
    Py_XINCREF(transports);
    Py_ssize_t n = PyList_GET_SIZE(fds);
    for (Py_ssize_t i = 0; i < n; i++) {
        ssize_t done;
        if (transports != NULL) {
            PyObject *self = PyList_GET_ITEM(transports, i);
            PyObject *res = PyObject_VectorcallMethod(
                is_closing_name, &self, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
            if (res == NULL) {
                goto error;
            }
            int closing = PyObject_IsTrue(res);
            Py_DECREF(res);
            if (closing < 0) {
                goto error;
            }
            if (closing) {
                done = -1;
                goto report;
            }
        }
        int overflow = 0;
        long fd = PyLong_AsLongAndOverflow(PyList_GET_ITEM(fds, i), &overflow);
        if (fd == -1 && PyErr_Occurred()) {
            goto error;
        }
        if (overflow != 0 || fd < 0 || fd > INT_MAX) {
            PyErr_Format(PyExc_ValueError, "fds[%zd] is not a file descriptor", i);
            goto error;
        }
        done = send((int)fd, data, (size_t)size, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (done < 0 && errno == ENOTSOCK) {
            done = write((int)fd, data, (size_t)size);
        }
        if (done == size) {
            continue;
        }
        if (done < 0) {
            done = (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) ? 0 : -1;
        }
    report:
        if (failed == NULL && (failed = PyList_New(0)) == NULL) {
            goto error;
        }
        PyObject *item = Py_BuildValue("(nn)", i, (Py_ssize_t)done);
        if (item == NULL) {
            goto error;
        }
        int rc = PyList_Append(failed, item);
        Py_DECREF(item);
        if (rc < 0) {
            goto error;
        }
    }
    Py_DECREF(fds);
    Py_XDECREF(transports);
    if (failed == NULL) {
        Py_RETURN_NONE;
    }
    return failed;

error:
    Py_DECREF(fds);
    Py_XDECREF(transports);
    Py_XDECREF(failed);
    return NULL;
}

static PyMethodDef fanout_methods[] = {
    {"write_each", (PyCFunction)(void (*)(void))write_each, METH_FASTCALL, write_each_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fanout_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "redis_ws_bench._writeloop",
    .m_doc = "The gateway's fan-out write loop, in C.",
    .m_size = 0,
    .m_methods = fanout_methods,
};

PyMODINIT_FUNC
PyInit__writeloop(void)
{
    if (is_closing_name == NULL
        && (is_closing_name = PyUnicode_InternFromString("is_closing")) == NULL) {
        return NULL;
    }
    return PyModuleDef_Init(&fanout_module);
}
