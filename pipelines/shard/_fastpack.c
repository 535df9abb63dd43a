/* The common sample of `odis shard`, packed in C: a plain JPEG stored unchanged, its boxes (if any) inside it.
 *
 * Why: on small images (Tiny-ImageNet's 2 KB files) the Python loop of write.py costs ~20 us a sample, twice
 * what GNU tar spends on a file, while its system calls (open, read, close) take ~4.5 us. This module does exactly
 * what write.py does for such a sample -- read the file, check it the way prepare_image(check="header") does
 * (jpeg_size, max_pixels, the end marker, the --resize-short threshold), write KEY.jpg and KEY.json as
 * TarWriter would -- and hands back everything else: at the first item it cannot handle byte for byte (boxes
 * to clip or of another image size, an unusual key, label or score, a file that fails to open or read as
 * planned, a JPEG with EXIF/XMP, a PNG, ...)
 * it stops and returns that item's index, and write.py takes it through the Python path, which also words the
 * errors. The shards are byte-identical with and without this module (tests/test_shard_native.py); without a
 * C compiler the package installs without it and write.py runs alone.
 *
 * pack(root_fd, items, start, stop, template, max_pixels, resize_short) -> (next, data, source_bytes, read)
 *   items: list of Item tuples (relpath, image_id, size, label, boxes, ...); items[start:next] were packed;
 *   read: the bytes of items[next] when it was read whole but is not for this path (an EXIF JPEG, a PNG, ...),
 *   so that Python does not read large photos twice; else None
 *   template: the 512-byte ustar header of tar.py with name, size and checksum fields still blank
 *
 * list_folder(path) -> [(name, kind, size or reason), ...]: scan.py's folder listing (the same tuples as its
 *   Python version: visible entries, unsorted; kind 0 file + size, 1 folder, 2 unreadable + strerror), without
 *   a DirEntry and a stat_result per file (half of the scan's cost on small images).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#define NAME_MAX_USTAR 100  /* a longer name takes a PAX header: the Python path */
#define MAX_FILE_SIZE (1 << 30)   /* larger files take the Python path (and are no small-file concern) */

typedef struct {
    PyObject *path;     /* bytes, the relpath in the filesystem encoding (owned reference) */
    const char *id;     /* the image_id's ASCII characters (borrowed from its str, kept alive by the list) */
    Py_ssize_t id_len;
    Py_ssize_t size;
    long long label;
    int has_label;
    char *boxes_json;   /* json.dumps(boxes) ", \"height\"..." is built around it; NULL: no boxes (malloc'd) */
    size_t boxes_len;
    char *scores_json;  /* json.dumps(scores) (malloc'd with boxes_json) */
    size_t scores_len;
    double extent[4];   /* min x0, min y0, max x1, max y1 over the boxes: inside the image or Python clips */
    long manifest_w, manifest_h;  /* the manifest's image size: another size, and Python leaves the boxes out */
} Job;

typedef struct {
    char *p;
    size_t len, cap;
} Buf;

static int reserve(Buf *b, size_t extra) {
    if (b->len + extra <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 1 << 20;
    while (cap < b->len + extra)
        cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p)
        return -1;
    b->p = p;
    b->cap = cap;
    return 0;
}

static int put_text(Buf *b, const char *s, size_t n) {
    if (reserve(b, n))
        return 0;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    return 1;
}

/* json.dumps of x, for an exact finite float (float.__repr__, as json's encoder) or None; 0 for anything else. */
static int put_json_number(Buf *b, PyObject *x) {
    if (x == Py_None)
        return put_text(b, "null", 4);
    if (!PyFloat_CheckExact(x) || !isfinite(PyFloat_AS_DOUBLE(x)))
        return 0;
    PyObject *r = PyObject_Repr(x);
    Py_ssize_t n = 0;
    const char *t = r ? PyUnicode_AsUTF8AndSize(r, &n) : NULL;
    int ok = t && put_text(b, t, (size_t)n);
    Py_XDECREF(r);
    PyErr_Clear();
    return ok;
}

/* The boxes and scores of an item as meta.py writes them when the image is stored at the manifest's size and
 * every box lies inside it: json.dumps([list(b) for b in boxes]) and json.dumps(list(scores)), one buffer. */
static int boxes_of(PyObject *item, Job *job) {
    if (PyTuple_GET_SIZE(item) < 7)
        return 0;
    PyObject *boxes = PyTuple_GET_ITEM(item, 4), *scores = PyTuple_GET_ITEM(item, 5);
    PyObject *wh = PyTuple_GET_ITEM(item, 6);
    if (!PyTuple_Check(scores) || !PyTuple_Check(wh) || PyTuple_GET_SIZE(wh) != 2 ||
        !PyLong_CheckExact(PyTuple_GET_ITEM(wh, 0)) || !PyLong_CheckExact(PyTuple_GET_ITEM(wh, 1)))
        return 0;
    job->manifest_w = PyLong_AsLong(PyTuple_GET_ITEM(wh, 0));
    job->manifest_h = PyLong_AsLong(PyTuple_GET_ITEM(wh, 1));
    if (PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    Buf b = {0};
    int ok = put_text(&b, "[", 1);
    for (Py_ssize_t k = 0; ok && k < PyTuple_GET_SIZE(boxes); k++) {
        PyObject *box = PyTuple_GET_ITEM(boxes, k);
        ok = PyTuple_Check(box) && PyTuple_GET_SIZE(box) == 4 && put_text(&b, k ? ", [" : "[", k ? 3 : 1);
        for (int c = 0; ok && c < 4; c++) {
            PyObject *v = PyTuple_GET_ITEM(box, c);
            ok = v != Py_None && (!c || put_text(&b, ", ", 2)) && put_json_number(&b, v);
            if (ok) {
                double x = PyFloat_AS_DOUBLE(v);
                if (k == 0 || (c < 2 ? x < job->extent[c] : x > job->extent[c]))
                    job->extent[c] = x;
            }
        }
        ok = ok && put_text(&b, "]", 1);
    }
    ok = ok && put_text(&b, "]", 1);
    job->boxes_len = b.len;
    ok = ok && put_text(&b, "[", 1);
    for (Py_ssize_t k = 0; ok && k < PyTuple_GET_SIZE(scores); k++)
        ok = (!k || put_text(&b, ", ", 2)) && put_json_number(&b, PyTuple_GET_ITEM(scores, k));
    ok = ok && put_text(&b, "]", 1);
    if (!ok) {
        free(b.p);
        return 0;
    }
    job->boxes_json = b.p;
    job->scores_json = b.p + job->boxes_len;
    job->scores_len = b.len - job->boxes_len;
    return 1;
}

/* Phase 1, with the GIL: the fields of item i, or 0 if the item is not for this path. */
static int job_of(PyObject *item, Job *job) {
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) < 5)
        return 0;
    PyObject *relpath = PyTuple_GET_ITEM(item, 0), *id = PyTuple_GET_ITEM(item, 1);
    PyObject *size = PyTuple_GET_ITEM(item, 2), *label = PyTuple_GET_ITEM(item, 3);
    PyObject *boxes = PyTuple_GET_ITEM(item, 4);
    if (!PyTuple_Check(boxes))
        return 0;
    if (!PyUnicode_Check(relpath) || !PyUnicode_Check(id) || !PyUnicode_IS_ASCII(id) || !PyLong_CheckExact(size))
        return 0;
    job->id = (const char *)PyUnicode_DATA(id);
    job->id_len = PyUnicode_GET_LENGTH(id);
    if (job->id_len == 0 || job->id_len + 5 > NAME_MAX_USTAR)  /* KEY.json must fit a plain ustar name */
        return 0;
    for (Py_ssize_t k = 0; k < job->id_len; k++) {  /* printable, and nothing json would escape */
        char c = job->id[k];
        if (c < 0x20 || c > 0x7e || c == '"' || c == '\\')
            return 0;
    }
    job->size = PyLong_AsSsize_t(size);
    if (job->size <= 0 || job->size > MAX_FILE_SIZE) {
        PyErr_Clear();
        return 0;
    }
    if (label == Py_None) {
        job->has_label = 0;
    } else if (PyLong_CheckExact(label)) {  /* not bool: json would write true/false */
        int overflow = 0;
        job->label = PyLong_AsLongLongAndOverflow(label, &overflow);
        if (overflow || (job->label == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            return 0;
        }
        job->has_label = 1;
    } else {
        return 0;
    }
    if (PyTuple_GET_SIZE(boxes) && !boxes_of(item, job))
        return 0;
    job->path = PyUnicode_EncodeFSDefault(relpath);
    if (!job->path || (Py_ssize_t)strlen(PyBytes_AS_STRING(job->path)) != PyBytes_GET_SIZE(job->path)) {
        PyErr_Clear();  /* an embedded NUL: let os.open say so */
        Py_CLEAR(job->path);
        free(job->boxes_json);
        job->boxes_json = NULL;
        return 0;
    }
    return 1;
}

/* jpeg_size of image.py: (w, h) from the SOF segment of a JPEG without APP1; 0 when anything is unusual. */
static int jpeg_size(const unsigned char *d, size_t n, long *w, long *h) {
    if (n < 2 || d[0] != 0xFF || d[1] != 0xD8)
        return 0;
    size_t i = 2;
    while (i + 9 <= n) {
        if (d[i] != 0xFF)
            return 0;
        unsigned m = d[i + 1];
        if (m == 0xFF) {
            i += 1;
        } else if (m == 0x01 || (m >= 0xD0 && m <= 0xD7)) {
            i += 2;
        } else if (m == 0xE1 || m == 0xD8 || m == 0xD9 || m == 0xDA) {
            return 0;
        } else if ((m >= 0xC0 && m <= 0xCF) && m != 0xC4 && m != 0xC8 && m != 0xCC) {
            *h = (d[i + 5] << 8) | d[i + 6];
            *w = (d[i + 7] << 8) | d[i + 8];
            return *w && *h;
        } else {
            i += 2 + (((size_t)d[i + 2] << 8) | d[i + 3]);
        }
    }
    return 0;
}

/* _looks_complete(JPEG): ends on EOI, or has an EOI within its last 4096 bytes. */
static int jpeg_complete(const unsigned char *d, size_t n) {
    size_t from = n > 4096 ? n - 4096 : 0;
    for (size_t i = n; i-- > from + 1;)
        if (d[i - 1] == 0xFF && d[i] == 0xD9)
            return 1;
    return 0;
}

/* Decimal digits of v at p; returns the end. (snprintf costs ~0.15 us a call: seven a sample were a fifth of
 * the user time here.) */
static char *put_int(char *p, long long v) {
    char tmp[24];
    int n = 0;
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    do {
        tmp[n++] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0)
        *p++ = '-';
    while (n)
        *p++ = tmp[--n];
    return p;
}

static char *put(char *p, const char *s, size_t n) {
    memcpy(p, s, n);
    return p + n;
}
#define put_lit(p, literal) put(p, literal, sizeof(literal) - 1)

/* The checksum-free sum of the template (name and size fields zero, checksum field spaces), set once. */
static unsigned long template_sum(const char *tmpl) {
    unsigned long sum = 0;
    for (int k = 0; k < 512; k++)
        sum += (unsigned char)tmpl[k];
    return sum;
}

/* tar.py's tar_header for a short ASCII name: the template with name, size (11 octal digits, NUL) and checksum
 * (6 octal digits, NUL, space) filled in; the checksum is the template's sum plus what was filled in. */
static void header(char *h, const char *tmpl, unsigned long sum, const char *id, size_t id_len, const char *ext,
                   size_t size) {
    memcpy(h, tmpl, 512);
    char *end = put(put(h, id, id_len), ext, strlen(ext));
    for (char *c = h; c < end; c++)
        sum += (unsigned char)*c;
    for (int k = 10; k >= 0; k--, size >>= 3) {
        h[124 + k] = (char)('0' + (size & 7));
        sum += (unsigned char)h[124 + k];
    }
    for (int k = 5; k >= 0; k--, sum >>= 3)
        h[148 + k] = (char)('0' + (sum & 7));
    h[154] = '\0';
}

static size_t padded(size_t n) { return (n + 511) / 512 * 512; }

/* An upper bound of meta_json's length. */
static size_t meta_json_max(const Job *job) { return 160 + (size_t)job->id_len + job->boxes_len + job->scores_len; }

/* meta.py's encode_meta: json.dumps(meta, sort_keys=True) byte for byte. */
static size_t meta_json(char *p, const Job *job, long w, long h) {
    char *start = p;
    p = put_lit(p, "{\"boxes\": ");
    p = job->boxes_json ? put(p, job->boxes_json, job->boxes_len) : put_lit(p, "[]");
    p = put_lit(p, ", \"height\": ");
    p = put_int(p, h);
    p = put_lit(p, ", \"image_id\": \"");
    p = put(p, job->id, (size_t)job->id_len);
    p = put_lit(p, "\", \"label\": ");
    p = job->has_label ? put_int(p, job->label) : put_lit(p, "null");
    p = put_lit(p, ", \"scores\": ");
    p = job->boxes_json ? put(p, job->scores_json, job->scores_len) : put_lit(p, "[]");
    p = put_lit(p, ", \"width\": ");
    p = put_int(p, w);
    *p++ = '}';
    return (size_t)(p - start);
}

enum { HANDED_OVER = 0, PACKED = 1, READ_NOT_PLAIN = 2 };

/* Phase 2, without the GIL: one sample appended to out (PACKED), or Python must take it: HANDED_OVER, or
 * READ_NOT_PLAIN when the file was read whole as planned (its bytes lie after out's end, at out->p + out->len +
 * 512: Python gets them instead of reading the file again). */
static int pack_one(int root, const Job *job, const char *tmpl, unsigned long sum, long long max_pixels,
                    long resize_short, Buf *out) {
    /* the image's header and padded data, then the json's header and padded json */
    if (reserve(out, 512 + padded((size_t)job->size + 1) + 512 + padded(meta_json_max(job))))
        return HANDED_OVER;
    int fd = openat(root, PyBytes_AS_STRING(job->path), O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return HANDED_OVER;
    char *h = out->p + out->len, *data = h + 512;
    ssize_t got = read(fd, data, (size_t)job->size + 1);  /* +1: a file that grew since planning shows here */
    close(fd);
    long w, ht;
    const unsigned char *u = (const unsigned char *)data;
    if (got != job->size)
        return HANDED_OVER;
    if (!jpeg_size(u, (size_t)got, &w, &ht) || (long long)w * ht > max_pixels || !jpeg_complete(u, (size_t)got) ||
        (resize_short > 0 && (w < ht ? w : ht) > resize_short))
        return READ_NOT_PLAIN;
    if (job->boxes_json && (job->manifest_w != w || job->manifest_h != ht || job->extent[0] < 0 ||
                            job->extent[1] < 0 || job->extent[2] > w || job->extent[3] > ht))
        return READ_NOT_PLAIN;  /* boxes of another size, or to clip: meta.py's warnings and clipping */
    size_t size = (size_t)got;
    header(h, tmpl, sum, job->id, (size_t)job->id_len, ".jpg", size);
    memset(data + size, 0, padded(size) - size);
    char *jh = data + padded(size), *json = jh + 512;
    size_t m = meta_json(json, job, w, ht);
    header(jh, tmpl, sum, job->id, (size_t)job->id_len, ".json", m);
    memset(json + m, 0, padded(m) - m);
    out->len = (size_t)(json + padded(m) - out->p);
    return PACKED;
}

static PyObject *pack(PyObject *self, PyObject *args) {
    int root;
    PyObject *items;
    Py_ssize_t start, stop;
    const char *tmpl;
    Py_ssize_t tmpl_len;
    long long max_pixels;
    long resize_short;
    if (!PyArg_ParseTuple(args, "iO!nny#Ll", &root, &PyList_Type, &items, &start, &stop, &tmpl, &tmpl_len,
                          &max_pixels, &resize_short))
        return NULL;
    if (tmpl_len != 512) {
        PyErr_SetString(PyExc_ValueError, "template must be 512 bytes");
        return NULL;
    }
    if (stop > PyList_GET_SIZE(items))
        stop = PyList_GET_SIZE(items);
    if (start < 0 || start > stop) {
        PyErr_SetString(PyExc_IndexError, "start out of range");
        return NULL;
    }
    Job *jobs = calloc((size_t)(stop - start) + 1, sizeof(Job));
    if (!jobs)
        return PyErr_NoMemory();
    Py_ssize_t njobs = 0;
    while (start + njobs < stop && job_of(PyList_GET_ITEM(items, start + njobs), &jobs[njobs]))
        njobs++;

    Buf out = {0};
    unsigned long sum = template_sum(tmpl);
    Py_ssize_t done = 0;
    long long source_bytes = 0;
    int last = HANDED_OVER;
    Py_BEGIN_ALLOW_THREADS
    for (; done < njobs; done++) {
        if ((last = pack_one(root, &jobs[done], tmpl, sum, max_pixels, resize_short, &out)) != PACKED)
            break;
        source_bytes += jobs[done].size;
    }
    Py_END_ALLOW_THREADS

    PyObject *read = Py_None, *data = PyBytes_FromStringAndSize(out.p ? out.p : "", (Py_ssize_t)out.len);
    if (last == READ_NOT_PLAIN && done < njobs)
        read = PyBytes_FromStringAndSize(out.p + out.len + 512, jobs[done].size);
    else
        Py_INCREF(read);
    for (Py_ssize_t k = 0; k < njobs; k++) {
        Py_XDECREF(jobs[k].path);
        free(jobs[k].boxes_json);
    }
    free(jobs);
    free(out.p);
    if (!data || !read) {
        Py_XDECREF(data);
        Py_XDECREF(read);
        return NULL;
    }
    return Py_BuildValue("nNLN", start + done, data, source_bytes, read);
}

enum { FILE_ENTRY = 0, FOLDER_ENTRY = 1, UNREADABLE_ENTRY = 2 };

typedef struct {
    char *name;
    int kind;
    long long value;  /* the size, or errno */
} Entry;

/* The visible entries of the folder open as fd: DT_DIR entries are folders without a stat (as DirEntry.is_dir);
 * everything else is stat'ed following symbolic links (as DirEntry.stat). Returns the count, or -1 (errno). */
static Py_ssize_t read_folder(int fd, Entry **out) {
    DIR *d = fdopendir(fd);
    if (!d) {
        int err = errno;
        close(fd);
        errno = err;
        return -1;
    }
    Py_ssize_t n = 0, cap = 64;
    Entry *e = malloc((size_t)cap * sizeof(Entry));
    struct dirent *de;
    while (e && (errno = 0, de = readdir(d))) {
        if (de->d_name[0] == '.')
            continue;
        if (n == cap) {
            Entry *bigger = realloc(e, (size_t)(cap *= 2) * sizeof(Entry));
            if (!bigger) {
                errno = ENOMEM;
                break;
            }
            e = bigger;
        }
        Entry *x = &e[n++];
        if (!(x->name = strdup(de->d_name))) {
            n--;
            errno = ENOMEM;
            break;
        }
        struct stat st;
        if (de->d_type == DT_DIR) {
            x->kind = FOLDER_ENTRY, x->value = 0;
        } else if (fstatat(dirfd(d), de->d_name, &st, 0) != 0) {
            x->kind = UNREADABLE_ENTRY, x->value = errno;
        } else {
            int folder = S_ISDIR(st.st_mode);  /* a link to a folder, or a filesystem without d_type */
            x->kind = folder ? FOLDER_ENTRY : FILE_ENTRY, x->value = folder ? 0 : st.st_size;
        }
    }
    int err = e ? errno : ENOMEM;
    closedir(d);
    if (err) {
        for (Py_ssize_t k = 0; k < n; k++)
            free(e[k].name);
        free(e);
        errno = err;
        return -1;
    }
    *out = e;
    return n;
}

static PyObject *list_folder(PyObject *self, PyObject *args) {
    PyObject *path;
    if (!PyArg_ParseTuple(args, "O&", PyUnicode_FSConverter, &path))
        return NULL;
    Entry *e = NULL;
    Py_ssize_t n;
    int fd;
    Py_BEGIN_ALLOW_THREADS
    fd = open(PyBytes_AS_STRING(path), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    n = fd < 0 ? -1 : read_folder(fd, &e);
    Py_END_ALLOW_THREADS
    if (n < 0) {
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, path);
        Py_DECREF(path);
        return NULL;
    }
    Py_DECREF(path);
    PyObject *list = PyList_New(n);
    for (Py_ssize_t k = 0; k < n; k++) {
        if (list) {
            PyObject *name = PyUnicode_DecodeFSDefault(e[k].name), *t = NULL;
            if (name)
                t = e[k].kind == UNREADABLE_ENTRY ? Py_BuildValue("NiN", name, e[k].kind,
                                                                  PyUnicode_DecodeLocale(strerror((int)e[k].value), NULL))
                                                  : Py_BuildValue("NiL", name, e[k].kind, e[k].value);
            if (t)
                PyList_SET_ITEM(list, k, t);
            else
                Py_CLEAR(list);
        }
        free(e[k].name);
    }
    free(e);
    return list;
}

static PyMethodDef methods[] = {
    {"list_folder", list_folder, METH_VARARGS, "The visible entries of a folder; see the source."},
    {"pack", pack, METH_VARARGS, "Pack plain-JPEG samples of items[start:stop] as tar members; see the source."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastpack", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastpack(void) { return PyModule_Create(&module); }
