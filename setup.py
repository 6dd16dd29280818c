from setuptools import setup

setup(cffi_modules=["capibara6/kernels/build_ffi.py:ffibuilder"])
