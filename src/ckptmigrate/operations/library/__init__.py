"""The ops, one module per family; each module registers its definitions when imported.

The registry imports every module here (:func:`..registry.operations`), so a
new module needs no list to be added to.
"""
