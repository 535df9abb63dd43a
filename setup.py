"""Only the optional C part of `odis shard` (pipelines/shard/_fastpack.c); everything else is in pyproject.toml.

optional=True: without a C compiler the package still installs, and `odis shard` runs its Python path alone
(same shards, slower on small images)."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("odis.pipelines.shard._fastpack", ["pipelines/shard/_fastpack.c"], optional=True,
                             extra_compile_args=["-O2"])])
