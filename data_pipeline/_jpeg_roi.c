/* Region-of-interest JPEG decoding with libjpeg-turbo: decode only the rows and columns of a crop box.
 *
 * A RandomResizedCrop keeps about half of the image on average, so a full decode spends about half of its IDCT,
 * upsampling and colour conversion on pixels that are thrown away. libjpeg-turbo can decode a part of an image
 * (libjpeg.txt, "Partial image decompression"):
 *
 *   - jpeg_crop_scanline() limits every row to a span of iMCU columns (8 or 16 pixels at scale 1);
 *   - jpeg_skip_scanlines() passes the rows above the box with (mostly) entropy decoding only: no IDCT, no colour;
 *   - the rows below the box are never decoded: jpeg_abort_decompress() stops there.
 *
 * Combined with DCT scaling (scale_num / scale_denom = 1/1, 1/2, 1/4, 1/8) this is the CPU counterpart of DALI's
 * fused decode + random crop. The pixels equal those of a full decode at the same scale, cropped (start_span has
 * the one place where libjpeg would otherwise differ). Not seen by this decoder: damage to the data below the box
 * (the caller checks that the data ends with an EOI marker, which catches truncated files).
 *
 * Python API (no numpy): decode_roi(data, x, y, width, height, scale_denom=1, max_pixels=0) -> (pixels, x_offset,
 * span_width), pixels a bytearray of height rows of span_width RGB pixels, the box at column x_offset. Raises
 * ValueError on corrupt or unsupported data (CMYK, YCCK), libjpeg warnings included (as simplejpeg's strict=True).
 * The GIL is released while decoding.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdio.h> /* jpeglib.h needs FILE and size_t first */
#include <string.h>

#include <jpeglib.h>

#ifndef LIBJPEG_TURBO_VERSION
#error "libjpeg-turbo is required (jpeg_crop_scanline, jpeg_skip_scanlines): IJG libjpeg lacks them"
#endif
#define STRINGIFY(x) #x
#define VERSION_STRING(x) STRINGIFY(x) /* LIBJPEG_TURBO_VERSION is a bare token (2.1.5) */

/* ---------------------------------------------------------------------------------------------- error handling */

/* libjpeg's default error handler prints to stderr and calls exit(); ours jumps back to the caller with the message. */
typedef struct {
    struct jpeg_error_mgr pub; /* first member: cinfo->err points here, and error_exit casts it back */
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
} ErrorManager;

static void error_exit(j_common_ptr cinfo)
{
    ErrorManager *err = (ErrorManager *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
}

/* level -1 is a warning (corrupt entropy data, premature end of data): fail, as simplejpeg's strict mode does, so
 * that the caller's fallback decides as before. Levels >= 0 are trace messages: ignored, never printed. */
static void emit_message(j_common_ptr cinfo, int level)
{
    if (level < 0)
        error_exit(cinfo);
}

static void output_message(j_common_ptr cinfo) { (void)cinfo; }

/* ---------------------------------------------------------------------------------------------------- decoding */

/* Parses the header and sets the output format: RGB at 1/scale_denom. Returns 0, or -1 with the error's message.
 * No Python API: runs without the GIL. */
static int read_header(j_decompress_ptr cinfo, const unsigned char *data, size_t size, int scale_denom)
{
    ErrorManager *err = (ErrorManager *)cinfo->err;
    if (setjmp(err->jump))
        return -1;
    jpeg_create_decompress(cinfo); /* allocates: can fail, hence inside the setjmp */
    jpeg_mem_src(cinfo, data, (unsigned long)size);
    jpeg_read_header(cinfo, TRUE);
    if (cinfo->jpeg_color_space == JCS_CMYK || cinfo->jpeg_color_space == JCS_YCCK) {
        /* libjpeg-turbo has no CMYK -> RGB conversion (Pillow has) */
        snprintf(err->message, JMSG_LENGTH_MAX, "CMYK/YCCK JPEG: not decoded to RGB here");
        return -1;
    }
    cinfo->out_color_space = JCS_RGB; /* from YCbCr, RGB or greyscale input */
    cinfo->scale_num = 1;
    cinfo->scale_denom = (unsigned int)scale_denom;
    /* the defaults (islow IDCT, fancy upsampling) are simplejpeg's: the same pixels as its full decode */
    jpeg_calc_output_dimensions(cinfo); /* output_width/height = ceil(image size / scale_denom) */
    return 0;
}

/* Starts the decompression and limits every row to a span of iMCU columns covering [x, x + width) of the scaled
 * image: *span_x and *span_width (in scaled pixels) say which. Returns 0, or -1 with the error's message. No Python
 * API: runs without the GIL. */
static int start_span(j_decompress_ptr cinfo, JDIMENSION x, JDIMENSION width, JDIMENSION *span_x,
                      JDIMENSION *span_width)
{
    ErrorManager *err = (ErrorManager *)cinfo->err;
    if (setjmp(err->jump))
        return -1;
    jpeg_start_decompress(cinfo); /* a progressive image is entropy-decoded in full here */

    /* Fancy (smooth) h2v1/h2v2 chroma upsampling interpolates each pixel's chroma from the neighbouring chroma
     * sample, but treats the ends of a cropped row as image edges (libjpeg.txt): the first and last column of the
     * span can differ from a full decode (by up to ~30 levels for 4:2:2 and 4:2:0). And a span of 1 chroma sample
     * (<= 2 pixels) makes jpeg_crop_scanline() switch that component to plain upsampling. Decoding 2 more columns
     * each side than asked, where the image has them, avoids both: the span's ends fall outside the box and it is
     * >= 3 pixels wide (or the whole row). Rows need no margin: jpeg_skip_scanlines() and the rows at the bottom of
     * the box keep their context rows. */
    JDIMENSION end = x + width + 2 < cinfo->output_width ? x + width + 2 : cinfo->output_width;
    *span_x = x >= 2 ? x - 2 : 0;
    *span_width = end - *span_x;
    /* moves *span_x left to an iMCU boundary (8 or 16 pixels at scale 1) and widens *span_width to match */
    jpeg_crop_scanline(cinfo, span_x, span_width);
    return 0;
}

/* Decodes rows [y, y + height) of the span into out, rows of output_width * 3 bytes. Returns 0, or -1 with the
 * error's message. No Python API: runs without the GIL. */
static int read_rows(j_decompress_ptr cinfo, JDIMENSION y, JDIMENSION height, unsigned char *out)
{
    ErrorManager *err = (ErrorManager *)cinfo->err;
    if (setjmp(err->jump))
        return -1;
    if (y > 0)
        jpeg_skip_scanlines(cinfo, y); /* entropy decoding only (plus the context rows upsampling needs) */
    for (JDIMENSION r = 0; r < height; r++) {
        /* straight into the output, the span's full width: copying the box's part out of a scratch row made a
         * full-size decode ~30% slower on our AMD EPYC machines (glibc's memcpy of short unaligned rows) */
        JSAMPROW row = out + (size_t)r * cinfo->output_width * 3;
        if (jpeg_read_scanlines(cinfo, &row, 1) != 1) {
            snprintf(err->message, JMSG_LENGTH_MAX, "no scanline %u", (unsigned)(y + r));
            return -1;
        }
    }
    /* no jpeg_finish_decompress: it would decode the rest of the image; abort keeps the object reusable */
    jpeg_abort_decompress(cinfo);
    return 0;
}

/* ------------------------------------------------------------------------------------------------- Python API */

PyDoc_STRVAR(decode_roi_doc,
             "decode_roi(data, x, y, width, height, scale_denom=1, max_pixels=0) -> (pixels, x_offset, span_width)\n\n"
             "Decodes the box (x, y, width, height) of a JPEG, in pixels of the image scaled by 1/scale_denom\n"
             "(1, 2, 4 or 8; the scaled size is ceil(size / scale_denom)). pixels is a bytearray of height rows of\n"
             "span_width RGB pixels; the box is columns [x_offset, x_offset + width) of it (the decoded span is\n"
             "wider, aligned to the JPEG's blocks). The box's pixels equal those of a full decode at that scale.\n"
             "Data below the box is not read.\n\n"
             "Raises ValueError for corrupt data (libjpeg warnings included), CMYK/YCCK images, a box outside\n"
             "the image, or more than max_pixels pixels in the full-size image (0: no limit).");

static PyObject *decode_roi(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"data", "x", "y", "width", "height", "scale_denom", "max_pixels", NULL};
    Py_buffer data;
    long long x, y, width, height, max_pixels = 0;
    int scale_denom = 1;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*LLLL|iL:decode_roi", keywords, &data, &x, &y, &width,
                                     &height, &scale_denom, &max_pixels))
        return NULL;
    if (scale_denom != 1 && scale_denom != 2 && scale_denom != 4 && scale_denom != 8) {
        PyBuffer_Release(&data);
        return PyErr_Format(PyExc_ValueError, "scale_denom=%d must be 1, 2, 4 or 8", scale_denom);
    }

    struct jpeg_decompress_struct cinfo;
    ErrorManager err;
    memset(&cinfo, 0, sizeof(cinfo));
    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = error_exit;
    err.pub.emit_message = emit_message;
    err.pub.output_message = output_message;
    err.message[0] = '\0';

    PyObject *pixels = NULL, *result = NULL;
    JDIMENSION span_x = 0, span_width = 0;
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = read_header(&cinfo, data.buf, (size_t)data.len, scale_denom);
    Py_END_ALLOW_THREADS
    if (status != 0) {
        PyErr_Format(PyExc_ValueError, "JPEG header: %s", err.message);
        goto done;
    }
    if (max_pixels > 0 && (long long)cinfo.image_width * cinfo.image_height > max_pixels) {
        /* before jpeg_start_decompress allocates anything image-sized: a decompression bomb costs only its header */
        PyErr_Format(PyExc_ValueError, "%ux%u pixels exceeds the limit of %lld", cinfo.image_width,
                     cinfo.image_height, max_pixels);
        goto done;
    }
    if (x < 0 || y < 0 || width < 1 || height < 1 || x + width > cinfo.output_width ||
        y + height > cinfo.output_height) {
        PyErr_Format(PyExc_ValueError, "box (%lld, %lld, %lld, %lld) is not inside the %ux%u image (1/%d scale)", x,
                     y, width, height, cinfo.output_width, cinfo.output_height, scale_denom);
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    status = start_span(&cinfo, (JDIMENSION)x, (JDIMENSION)width, &span_x, &span_width);
    Py_END_ALLOW_THREADS
    if (status != 0) {
        PyErr_Format(PyExc_ValueError, "JPEG data: %s", err.message);
        goto done;
    }
    pixels = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)height * span_width * 3);
    if (pixels == NULL)
        goto done;
    Py_BEGIN_ALLOW_THREADS
    status = read_rows(&cinfo, (JDIMENSION)y, (JDIMENSION)height, (unsigned char *)PyByteArray_AS_STRING(pixels));
    Py_END_ALLOW_THREADS
    if (status != 0) {
        PyErr_Format(PyExc_ValueError, "JPEG data: %s", err.message);
        goto done;
    }
    result = Py_BuildValue("(OII)", pixels, (unsigned)(x - span_x), (unsigned)span_width);
done:
    Py_XDECREF(pixels);
    jpeg_destroy_decompress(&cinfo); /* also after a failed create: it checks cinfo.mem */
    PyBuffer_Release(&data);
    return result;
}

static PyMethodDef methods[] = {
    {"decode_roi", (PyCFunction)(void (*)(void))decode_roi, METH_VARARGS | METH_KEYWORDS, decode_roi_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "data_pipeline._jpeg_roi",
    .m_doc = "Region-of-interest JPEG decoding (libjpeg-turbo crop + skip + DCT scaling); see _jpeg_roi.c.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__jpeg_roi(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddStringConstant(m, "LIBJPEG_TURBO_VERSION", VERSION_STRING(LIBJPEG_TURBO_VERSION)) < 0)
        Py_CLEAR(m);
    return m;
}
