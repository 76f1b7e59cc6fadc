"""PEFT LoRA adapters follow their base model's lineage.

An adapter holds, for some of its base model's weights, low-rank factors
(``lora_A``, ``lora_B``; DoRA's magnitude; the adapter's own bias) and, for
``modules_to_save``, full copies. A migration that renames, splits, fuses or
transposes base weights says exactly how the adapter has to change:

* :mod:`.layout` reads ``adapter_config.json`` and the adapter's keys, and
  finds each module's base weight in the schema at a revision;
* :mod:`.follow` runs each revision on the base model's schema and carries the
  adapter through its plan, asking every op for its low-rank counterpart
  (``Operation.low_rank``);
* :mod:`.output` turns the result into the new adapter file's entries and
  ``adapter_config.json`` (target modules, ranks and alphas, ``fan_in_fan_out``);
* :mod:`.placement` finds the revision of an adapter without a stamp (PEFT
  writes none) from its keys and shapes, and checks a claimed one;
* :mod:`.run` is the adapter's part of ``upgrade``/``downgrade``/``stamp``/``current``.

None of this imports the ``peft`` package: the layout is read from the files.
"""
