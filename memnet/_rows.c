/* memnet._rows: the type of a small memory's handle (memnet/dense.py: DenseMemory), an
 * object that Python's cyclic garbage collector does not track.
 *
 * A partition may hold millions of small memories, one handle each. Every class defined in
 * Python makes objects the collector tracks: each full collection then walks all of them,
 * and creating them triggers full collections (Python runs one each time the tracked
 * objects that survived grew by a quarter: three for 100,000 new memories, each walking
 * every object of the process, JAX's included). A handle holds only its arena and its row
 * number, has no __dict__, cannot be subclassed, and the arena never refers to its
 * handles: a handle can be in no reference cycle, so its type is made without
 * Py_TPFLAGS_HAVE_GC and its objects are freed by reference counting alone.
 *
 * DenseMemory(arena) takes a row (arena.take()); freeing the handle gives it back
 * (arena.give(row)), as DenseMemory.__del__ did. The type is a heap type whose dictionary
 * memnet/dense.py completes with the memory's methods and properties (a class statement
 * would make a collected type).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

typedef struct {
    PyObject_HEAD
    PyObject *arena;
    Py_ssize_t row;
} Row;

static PyObject *row_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *names[] = {"arena", NULL};
    PyObject *arena;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:DenseMemory", names, &arena))
        return NULL;
    PyObject *taken = PyObject_CallMethod(arena, "take", NULL);
    if (!taken)
        return NULL;
    Py_ssize_t row = PyNumber_AsSsize_t(taken, PyExc_OverflowError);
    Py_DECREF(taken);
    if (row == -1 && PyErr_Occurred())
        return NULL;
    Row *self = (Row *)type->tp_alloc(type, 0);
    if (!self) { /* give the row back; the MemoryError stays the one raised */
        PyObject *type_, *value, *traceback;
        PyErr_Fetch(&type_, &value, &traceback);
        Py_XDECREF(PyObject_CallMethod(arena, "give", "n", row));
        PyErr_Clear();
        PyErr_Restore(type_, value, traceback);
        return NULL;
    }
    Py_INCREF(arena);
    self->arena = arena;
    self->row = row;
    return (PyObject *)self;
}

static void row_dealloc(Row *self)
{
    PyTypeObject *type = Py_TYPE(self);
    if (self->arena) {
        PyObject *type_, *value, *traceback; /* (freed while an exception may be set) */
        PyErr_Fetch(&type_, &value, &traceback);
        PyObject *given = PyObject_CallMethod(self->arena, "give", "n", self->row);
        if (!given)
            PyErr_WriteUnraisable(self->arena);
        Py_XDECREF(given);
        Py_CLEAR(self->arena);
        PyErr_Restore(type_, value, traceback);
    }
    type->tp_free(self);
    Py_DECREF(type); /* (an object of a heap type holds a reference to it) */
}

static PyMemberDef row_members[] = {
    {"arena", T_OBJECT_EX, offsetof(Row, arena), READONLY, "the arena holding the row"},
    {"row", T_PYSSIZET, offsetof(Row, row), READONLY, "the memory's row of the arena"},
    {NULL},
};

static PyType_Slot row_slots[] = {
    {Py_tp_new, row_new},
    {Py_tp_dealloc, row_dealloc},
    {Py_tp_members, row_members},
    {Py_tp_doc, "A small memory: a row of an arena (memnet/dense.py)."},
    {0, NULL},
};

/* No Py_TPFLAGS_HAVE_GC (never tracked), no BASETYPE (no subclass could add a __dict__),
 * not IMMUTABLETYPE (memnet/dense.py sets the methods). */
static PyType_Spec row_spec = {"memnet.dense.DenseMemory", sizeof(Row), 0, Py_TPFLAGS_DEFAULT,
                               row_slots};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "memnet._rows",
                                    "Handles of small memories, untracked by the collector.",
                                    -1, NULL};

PyMODINIT_FUNC PyInit__rows(void)
{
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    PyObject *type = PyType_FromSpec(&row_spec);
    if (!type || PyModule_AddObject(m, "DenseMemory", type) < 0) {
        Py_XDECREF(type);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
