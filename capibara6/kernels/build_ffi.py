"""cffi (API mode) builder for capibara6.kernels._kernels.

Used three ways:
  * setuptools: setup.py has cffi_modules=["capibara6/kernels/build_ffi.py:ffibuilder"] (pip install -e .)
  * directly:   python capibara6/kernels/build_ffi.py          -> compiles capibara6/kernels/_kernels*.so in place
  * cross:      python capibara6/kernels/build_ffi.py --emit-c OUT.c  -> only writes cffi's C (scripts/test_arm.sh)
  * elsewhere:  python capibara6/kernels/build_ffi.py --outdir DIR    -> DIR/capibara6/kernels/{__init__.py,_kernels*.so}
                (tests build the CAPIBARA6_PORTABLE=1 variant this way)
Env: CAPIBARA6_PORTABLE=1 -> no -march/-mcpu flags; CAPIBARA6_FORCE_PORTABLE=1 -> also disable
the NEON paths (-DC6_FORCE_PORTABLE) so the portable C is used even on aarch64;
CAPIBARA6_KERNEL_ARCH_FLAGS="-march=x86-64-v3 ..." -> these flags instead of -march/-mcpu=native
(scripts/_install.sh sets it when a CPU probe finds an extension the CPU reports but cannot run).
"""
import os
import platform
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
SRC_DIR = os.path.join(HERE, "src")
SOURCES = ["pool.c", "matmul.c", "elementwise.c", "fp8.c", "attention.c", "qblocks.c", "qmatmul.c", "qmatmul16.c", "crash.c"]

CDEF = """
int  c6_set_num_threads(int n);
int  c6_get_num_threads(void);
int  c6_use_threads(int n);
int  c6_build_flags(void);
void c6_matmul(const float *x, const float *w, float *y, int64_t M, int64_t N, int64_t K);
void c6_softmax(const float *x, float *y, int64_t R, int64_t C);
void c6_rmsnorm(const float *x, const float *w, float *y, int64_t R, int64_t D, float eps);
void c6_rope(const float *x, const int32_t *pos, float *y, int64_t T, int64_t H, int64_t D,
             int64_t rot_dim, int neox, double base, double freq_scale);
void c6_swiglu(const float *g, const float *u, float *y, int64_t n);
void c6_geglu(const float *g, const float *u, float *y, int64_t n);
void c6_gelu(const float *x, float *y, int64_t n);
void c6_exp(const float *x, float *y, int64_t n);
void c6_fp8_encode(const float *x, const float *scale, int64_t scale_stride, uint8_t *q, int64_t R, int64_t D);
void c6_fp8_decode(const uint8_t *q, const float *scale, int64_t scale_stride, float *y, int64_t R, int64_t D);
void c6_fp8_quantize_rows(const float *x, uint8_t *q, float *scale, int64_t R, int64_t D);
int  c6_attention(const float *q, const void *k, const void *v, const float *k_scale,
                  const float *v_scale, int kv_fp8, float *out, int64_t T, int64_t Hq, int64_t Hkv,
                  int64_t D, int64_t n_past, float scale, int64_t window, int64_t ring);
int  c6_attention_paged(const float *q, const void *k, const void *v, const float *k_scale,
                        const float *v_scale, int kv_fp8, float *out, int64_t n_seq, int64_t T_total,
                        const int64_t *q_start, const int64_t *n_past, const int32_t *tables,
                        int64_t max_blocks, int64_t block, int64_t n_blocks, int64_t Hq, int64_t Hkv,
                        int64_t D, float scale, int64_t window, int64_t *err);
int  c6_qmatmul(const float *x, const void *w, int wtype, float *y, int64_t M, int64_t N, int64_t K);
int  c6_qmatmul16(const float *x, const void *w, int wtype, float *y, int64_t M, int64_t N, int64_t K);
int  c6_qdequant(const void *w, int wtype, float *y, int64_t R, int64_t K);
int  c6_qtype_block(int wtype, int *values, int *bytes);
float    c6_f16_to_f32(uint16_t h);
uint16_t c6_f32_to_f16(float f);
#define C6_CRASH_ID ...
int  c6_crash_install(int fd);
void c6_crash_set_model(const char *id);
int  c6_crash_model(char *out, int cap);
int  c6_crash_format(int sig, int code, uintptr_t addr, char *out, int cap);
"""


def compile_args(machine=None):
    machine = machine or platform.machine()
    args = ["-O3", "-std=gnu11", "-pthread", "-fno-math-errno", "-Wall", "-Wno-unused-function"]
    if os.environ.get("CAPIBARA6_FORCE_PORTABLE") == "1":
        args.append("-DC6_FORCE_PORTABLE")
    arch_flags = os.environ.get("CAPIBARA6_KERNEL_ARCH_FLAGS", "").split()
    if os.environ.get("CAPIBARA6_PORTABLE") == "1":
        pass
    elif arch_flags:
        args.extend(arch_flags)
    else:
        if machine in ("x86_64", "AMD64", "i686"):
            args.append("-march=native")
        elif machine in ("aarch64", "arm64"):
            args.append("-mcpu=native")
    return args


def _rel(p):
    # setuptools wants source paths relative to the project root (its cwd)
    try:
        r = os.path.relpath(p)
    except ValueError:
        return p
    return p if r.startswith("..") else r


def make_builder(fix=_rel):
    b = FFI()
    b.cdef(CDEF)
    b.set_source(
        "capibara6.kernels._kernels",
        '#include "capibara6_kernels.h"',
        sources=[fix(os.path.join(SRC_DIR, s)) for s in SOURCES],
        include_dirs=[fix(SRC_DIR)],
        extra_compile_args=compile_args(),
        extra_link_args=["-pthread"],
        libraries=["m"],
    )
    return b


ffibuilder = make_builder()


def main(argv):
    if len(argv) >= 2 and argv[0] == "--emit-c":
        make_builder(os.path.abspath).emit_c_code(argv[1])
        return 0
    import glob
    import shutil

    root = os.path.dirname(os.path.dirname(HERE))  # the repository; build/ is gitignored
    tmp = os.path.join(root, "build", "cffi-kernels")
    if os.environ.get("CAPIBARA6_PORTABLE") == "1" or os.environ.get("CAPIBARA6_FORCE_PORTABLE") == "1":
        tmp += "-portable"
    os.makedirs(tmp, exist_ok=True)
    so = make_builder(os.path.abspath).compile(tmpdir=tmp, verbose=bool(os.environ.get("VERBOSE")))
    dest_dir = HERE
    if len(argv) >= 2 and argv[0] == "--outdir":
        package_dir = os.path.join(os.path.abspath(argv[1]), "capibara6")  # just the package and its kernels
        dest_dir = os.path.join(package_dir, "kernels")
        os.makedirs(dest_dir, exist_ok=True)
        shutil.copy2(os.path.join(os.path.dirname(HERE), "__init__.py"), package_dir)
        shutil.copy2(os.path.join(HERE, "__init__.py"), dest_dir)
    for old in glob.glob(os.path.join(dest_dir, "_kernels.*.so")):
        os.remove(old)
    name = os.path.basename(so)
    import importlib.machinery
    if sys.implementation.name == "cpython" and ".abi3.so" in importlib.machinery.EXTENSION_SUFFIXES \
            and not hasattr(sys, "gettotalrefcount"):
        # cffi's C defines Py_LIMITED_API: use the same file name as the setuptools/pip build so
        # a direct build and `pip install -e .` never leave two competing modules behind
        name = "_kernels.abi3.so"
    dst = os.path.join(dest_dir, name)
    shutil.copy2(so, dst)
    print(dst)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
