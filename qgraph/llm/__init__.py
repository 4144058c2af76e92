"""Small language models: the stdlib-trained Llama, its checkpoint, 8da4w PTQ / QAT and the
README table.

* :mod:`qgraph.llm.train` — plain training / evaluation loops and the fp32 checkpoint
  (``python -m qgraph.llm.train``);
* :mod:`qgraph.llm.table` — PTQ and QAT 8da4w, the ``.pte`` and ONNX runs, the acceptance
  table (``python -m qgraph.llm.table``).
"""
