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
 *
 * The events and answers of memnet/engine.py (Write, Query, Answer) are of types made here
 * for the same reason: one is made per event, and as objects of classes defined in Python
 * each batch's survived the young collections while the batch ran and triggered full
 * collections (scripts/bench_small.py's in-process run: docs/performance.md), which cost
 * more the more objects the process holds. Each is a fixed set of
 * read-only fields given by position or keyword, a missing one None (Answer's extra: a
 * fresh dict). They refer to arrays and (Answer's extra) a dict of response fields. What
 * the collector does not track it cannot free from a cycle: an answer put into its own
 * extra (or into an object its extra holds) would leak with everything it refers to, and
 * gc.get_referents does not see through these objects; memnet makes no such cycle (its
 * extra holds strings and numbers). Records nested in records a million deep would exhaust
 * the C stack when freed (no trashcan, which needs a tracked type); memnet never nests them.
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

/* ---- records: Write, Query, Answer --------------------------------------------------- */

#define MAX_FIELDS 4

typedef struct {
    PyObject_HEAD
    PyObject *field[MAX_FIELDS];
} Record;

#define FIELD(name, i, doc) {name, T_OBJECT, offsetof(Record, field) + (i) * sizeof(PyObject *), \
                             READONLY, doc}

static PyMemberDef write_members[] = {
    FIELD("row", 0, "the encoder's prepared input"),
    {NULL},
};

static PyMemberDef query_members[] = {
    FIELD("row", 0, "input space: v = I(x), or None"),
    FIELD("q", 1, "memory space: v = q, or None"),
    {NULL},
};

static PyMemberDef answer_members[] = {
    FIELD("y", 0, "[Y] the response"),
    FIELD("slots", 1, "[k] retrieved slots, nearest first"),
    FIELD("weights", 2, "[k] attention weights"),
    FIELD("extra", 3, "response fields such as \"answer\""),
    {NULL},
};

typedef struct {
    const char *name; /* for messages */
    int fields;
    int required;     /* the first this many must be given */
    int fresh_dict;   /* the field that defaults to a new dict (a missing or None value), or -1 */
    const PyMemberDef *members; /* the fields, in order: their names */
} Kind;

static const Kind WRITE = {"Write", 1, 1, -1, write_members};
static const Kind QUERY = {"Query", 2, 0, -1, query_members};
static const Kind ANSWER = {"Answer", 4, 3, 3, answer_members};

static int record_keywords(PyObject *kwds, const Kind *kind, PyObject **values)
{
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(kwds, &pos, &key, &value)) {
        int i = 0;
        while (i < kind->fields && !(PyUnicode_Check(key) &&
                                     PyUnicode_CompareWithASCIIString(key, kind->members[i].name) == 0))
            i++;
        if (i == kind->fields) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%S'",
                         kind->name, key);
            return -1;
        }
        if (values[i]) {
            PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'",
                         kind->name, kind->members[i].name);
            return -1;
        }
        values[i] = value;
    }
    return 0;
}

static PyObject *record_new(PyTypeObject *type, PyObject *args, PyObject *kwds, const Kind *kind)
{
    PyObject *values[MAX_FIELDS] = {NULL};
    Py_ssize_t given = PyTuple_GET_SIZE(args);
    if (given > kind->fields) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %d arguments (%zd given)", kind->name,
                     kind->fields, given);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < given; i++)
        values[i] = PyTuple_GET_ITEM(args, i);
    if (kwds && record_keywords(kwds, kind, values) < 0)
        return NULL;
    for (int i = 0; i < kind->required; i++)
        if (!values[i]) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", kind->name,
                         kind->members[i].name);
            return NULL;
        }
    Record *self = (Record *)type->tp_alloc(type, 0);
    if (!self)
        return NULL;
    for (int i = 0; i < kind->fields; i++) {
        PyObject *v = values[i] ? values[i] : Py_None;
        if (i == kind->fresh_dict && v == Py_None) {
            v = PyDict_New();
            if (!v) {
                Py_DECREF(self);
                return NULL;
            }
        } else
            Py_INCREF(v);
        self->field[i] = v;
    }
    return (PyObject *)self;
}

static void record_dealloc(Record *self)
{
    PyTypeObject *type = Py_TYPE(self);
    for (int i = 0; i < MAX_FIELDS; i++) /* (fields a kind does not have stay NULL) */
        Py_CLEAR(self->field[i]);
    type->tp_free(self);
    Py_DECREF(type);
}

/* Each kind's tp_new (record_new with its Kind) and slots. */
#define RECORD_TYPE(lower, KIND)                                                       \
    static PyObject *lower##_new(PyTypeObject *type, PyObject *args, PyObject *kwds)   \
    {                                                                                  \
        return record_new(type, args, kwds, &KIND);                                   \
    }                                                                                  \
    static PyType_Slot lower##_slots[] = {                                             \
        {Py_tp_new, lower##_new},                                                      \
        {Py_tp_dealloc, record_dealloc},                                               \
        {Py_tp_members, lower##_members},                                              \
        {0, NULL},                                                                     \
    };

RECORD_TYPE(write, WRITE)
RECORD_TYPE(query, QUERY)
RECORD_TYPE(answer, ANSWER)

/* As DenseMemory: untracked, not subclassable, completed by memnet/engine.py (docs, repr). */
static PyType_Spec record_specs[] = {
    {"memnet.engine.Write", sizeof(Record), 0, Py_TPFLAGS_DEFAULT, write_slots},
    {"memnet.engine.Query", sizeof(Record), 0, Py_TPFLAGS_DEFAULT, query_slots},
    {"memnet.engine.Answer", sizeof(Record), 0, Py_TPFLAGS_DEFAULT, answer_slots},
};

static int add_type(PyObject *m, PyType_Spec *spec, const char *name)
{
    PyObject *type = PyType_FromSpec(spec);
    if (!type || PyModule_AddObject(m, name, type) < 0) {
        Py_XDECREF(type);
        return -1;
    }
    return 0;
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "memnet._rows",
                                    "Small memories' handles, events and answers: untracked by the collector.",
                                    -1, NULL};

PyMODINIT_FUNC PyInit__rows(void)
{
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    if (add_type(m, &row_spec, "DenseMemory") < 0 || add_type(m, &record_specs[0], "Write") < 0 ||
        add_type(m, &record_specs[1], "Query") < 0 || add_type(m, &record_specs[2], "Answer") < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
