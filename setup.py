from setuptools import setup

setup(cffi_modules=["native/ffibuild.py:ffibuilder"])
