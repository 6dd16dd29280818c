from setuptools import setup

setup(cffi_modules=["kernels/build_ffi.py:ffibuilder"])
