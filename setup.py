"""Only the compiled part of the package; everything else is in pyproject.toml.

The float16 sweep kernel is optional: where it cannot be compiled, the sweep uses torch's kernel instead (slower
at small dimensions; see query/hunt/fp16dot.py).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "scatlas.query.hunt._fp16dot",
            sources=["query/hunt/_fp16dot.c"],
            extra_compile_args=["-O3", "-std=c11"],
            optional=True,
        )
    ]
)
