"""The built-in merge methods, one module per family; each registers its methods with
``decomp.merging.registry.register_merge_method`` when imported.

Every module of this package is imported here, found by pkgutil: adding a method is one new file (its
declaration and formula) and its formula test, with no list to edit.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
